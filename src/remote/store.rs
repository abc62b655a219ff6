//! URL parsing, one `object_store` client per bucket or server, and the two
//! requests remote files make: HEAD at open and ranged, ETag-conditioned
//! GETs for chunks. Errors are boiled down to one line naming the HTTP
//! status (or the timeout), never the server's whole answer.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, RetryConfig,
};
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};

/// An object: the client of its bucket or server and its path there.
#[derive(Clone)]
pub(crate) struct Object {
    store: Arc<dyn ObjectStore>,
    path: StorePath,
}

/// What a failed request amounts to.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request failed (status, timeout, connection).
    Store(object_store::Error),
    /// The object is no longer the version opened.
    Changed(String),
}

impl From<object_store::Error> for Failure {
    fn from(e: object_store::Error) -> Self {
        Failure::Store(e)
    }
}

impl Object {
    /// Parses `url` and finds (or builds) the client for its bucket or server.
    pub(crate) fn parse(url: &str) -> Result<Object> {
        let bad = |why: &str| Err(Error::invalid(why.to_string()).with_path(url));
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let scheme = scheme.to_ascii_lowercase();
        if rest.contains(['?', '#']) {
            return bad("URLs with a query or fragment are not supported (they may carry credentials); give credentials through the environment (AWS_*, GOOGLE_*, AZURE_*)");
        }
        let (authority, key) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return bad("URLs with user:password@ are not supported (they would leak into logs and `vdiskfs list`); give credentials through the environment (AWS_*, GOOGLE_*, AZURE_*)");
        }
        if authority.is_empty() {
            return bad(if matches!(scheme.as_str(), "s3" | "gs" | "az") {
                "no bucket (or container) in the URL"
            } else {
                "no host in the URL"
            });
        }
        if key.is_empty() || key.ends_with('/') {
            return bad("the URL names no object");
        }
        let path = StorePath::parse(key).map_err(|e| {
            Error::invalid(format!(
                "not a valid object path: {}",
                one_line(&e.to_string())
            ))
            .with_path(url)
        })?;
        let base = format!("{scheme}://{authority}");
        let store = client(&scheme, authority, &base).map_err(|e| e.with_path(url))?;
        Ok(Object { store, path })
    }

    /// HEAD: the object's size and ETag.
    pub(crate) async fn head(&self) -> std::result::Result<ObjectMeta, object_store::Error> {
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        Ok(self.store.get_opts(&self.path, opts).await?.meta)
    }

    /// Ranged GET of the first `n` bytes: the object's size and ETag (from
    /// `Content-Range` and `ETag`) and its head, in one round trip.
    pub(crate) async fn get_head(
        &self,
        n: u64,
    ) -> std::result::Result<(ObjectMeta, bytes::Bytes), object_store::Error> {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(0..n)),
            ..Default::default()
        };
        let got = self.store.get_opts(&self.path, opts).await?;
        let meta = got.meta.clone();
        Ok((meta, got.bytes().await?))
    }

    /// GET of `range`, only if the object still has `e_tag` (If-Match, and
    /// the returned ETag compared too, for servers that ignore If-Match).
    pub(crate) async fn get(
        &self,
        range: std::ops::Range<u64>,
        e_tag: Option<&str>,
    ) -> std::result::Result<bytes::Bytes, Failure> {
        let want = range.end - range.start;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: e_tag.map(str::to_string),
            ..Default::default()
        };
        let got = match self.store.get_opts(&self.path, opts).await {
            Err(object_store::Error::Precondition { .. }) => {
                return Err(Failure::Changed(
                    "the server refused the ETag (HTTP 412)".into(),
                ))
            }
            other => other?,
        };
        if let (Some(want_tag), Some(got_tag)) = (e_tag, got.meta.e_tag.as_deref()) {
            if want_tag != got_tag {
                return Err(Failure::Changed(format!("ETag is now {got_tag}")));
            }
        }
        let bytes = got.bytes().await?;
        if bytes.len() as u64 != want {
            return Err(Failure::Changed(format!(
                "a ranged GET of {want} bytes returned {}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

/// The client for `scheme://authority`, built once per process.
fn client(scheme: &str, authority: &str, base: &str) -> Result<Arc<dyn ObjectStore>> {
    static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    if let Some(c) = clients.lock().get(base) {
        return Ok(c.clone());
    }
    let s = super::settings();
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: s.max_retries,
        retry_timeout: s.retry_timeout,
    };
    let options = ClientOptions::new()
        .with_timeout(s.request_timeout)
        .with_connect_timeout(s.connect_timeout);
    let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
        "s3" => {
            let b = AmazonS3Builder::from_env()
                .with_bucket_name(authority)
                .with_retry(retry)
                .with_client_options(options.with_allow_http(super::aws::allow_http()));
            let b = super::aws::apply(b)?;
            b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        // Credentials and settings from the environment, each cloud's way
        // (GOOGLE_*, AZURE_*: see docs/remote.md); only plain http is ours
        // to allow, since the client options given here replace theirs.
        "gs" => GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(authority)
            .with_retry(retry)
            .with_client_options(options.with_allow_http(env_true("GOOGLE_ALLOW_HTTP")))
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
        "az" => MicrosoftAzureBuilder::from_env()
            .with_container_name(authority)
            .with_retry(retry)
            .with_client_options(options.with_allow_http(env_true("AZURE_ALLOW_HTTP")))
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
        "http" | "https" => HttpBuilder::new()
            .with_url(base)
            .with_retry(retry)
            .with_client_options(options.with_allow_http(scheme == "http"))
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
        other => {
            return Err(Error::unsupported(format!(
                "URL scheme {other:?} is not supported (s3, gs, az, http, https)"
            )))
        }
    };
    let c = built.map_err(|e| describe(&e, "cannot set up the client"))?;
    clients.lock().insert(base.to_string(), c.clone());
    Ok(c)
}

/// True when the environment variable `k` is `true` (any case).
fn env_true(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// One line for a failed request: what we did, then the HTTP status or the
/// kind of network failure.
pub(crate) fn describe(e: &object_store::Error, what: &str) -> Error {
    let text = one_line(&e.to_string());
    let kind = match e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Io,
    };
    // object_store's text names the request's URL (with a SAS token's
    // query, for Azure) and, after retries, its `retry_timeout` setting:
    // neither may reach the message or be taken for a timeout.
    let text = text
        .split(' ')
        .filter(|w| !w.contains("://"))
        .collect::<Vec<_>>()
        .join(" ")
        .replace("retry_timeout", "retry limit");
    let why = if let Some(status) = status_of(&text) {
        format!("HTTP {status}")
    } else if matches!(e, object_store::Error::NotFound { .. }) {
        "HTTP 404 Not Found".to_string()
    } else if text.contains("timed out") || text.contains("timeout") {
        "request timed out (after retries)".to_string()
    } else if text.contains("onnect") {
        "cannot connect to the server (after retries)".to_string()
    } else {
        text.chars().take(200).collect()
    };
    Error::new(kind, format!("{what}: {why}"))
}

/// The HTTP status and reason in an object_store error's text ("... status
/// code: 403 Forbidden: BODY", "... with status 404 Not Found: ...").
fn status_of(text: &str) -> Option<String> {
    let mut rest = text;
    while let Some(at) = rest.find("status") {
        rest = &rest[at + "status".len()..];
        let digits_at = rest.find(|c: char| c.is_ascii_digit())?;
        if digits_at > 8 {
            continue;
        }
        let tail = &rest[digits_at..];
        let code: String = tail.chars().take_while(char::is_ascii_digit).collect();
        if code.len() != 3 {
            continue;
        }
        let reason: String = tail[3..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic() || *c == ' ')
            .take(40)
            .collect();
        return Some(format!("{code} {}", reason.trim()).trim().to_string());
    }
    None
}

/// `s` on one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// [`describe`] for a chunk fetch.
pub(crate) fn describe_failure(f: &Failure) -> Error {
    match f {
        Failure::Store(e) if status_of(&e.to_string()).is_some_and(|s| s.starts_with("412")) => {
            describe_failure(&Failure::Changed("HTTP 412".into()))
        }
        Failure::Store(e) => describe(e, "remote read failed"),
        Failure::Changed(why) => Error::new(
            ErrorKind::Io,
            format!(
                "the object changed since it was mounted ({why}); remount to read the new version"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_found_in_error_text() {
        assert_eq!(
            status_of("Error performing GET x in 2ms - Server returned non-2xx status code: 403 Forbidden: <xml/>").as_deref(),
            Some("403 Forbidden")
        );
        assert_eq!(
            status_of("Client error with status 404 Not Found: No Body").as_deref(),
            Some("404 Not Found")
        );
        assert_eq!(status_of("connection refused"), None);
    }

    #[test]
    fn urls_with_secrets_are_refused() {
        for url in [
            "https://user:pw@example.com/disk.qcow2",
            "https://example.com/disk.qcow2?X-Amz-Signature=abc",
            "s3:///key",
            "s3://bucket/",
        ] {
            assert_eq!(
                Object::parse(url).err().map(|e| e.kind()),
                Some(ErrorKind::InvalidInput),
                "{url}"
            );
        }
    }
}
