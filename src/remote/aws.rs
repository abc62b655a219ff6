//! The AWS configuration of `s3://` images beyond what object_store reads
//! from the environment: mount options (`--aws-region`, `--aws-endpoint`,
//! `--aws-allow-http`, `--aws-profile`, and their `-o` spellings) and the
//! static credentials, region and endpoint of a profile in the shared
//! files `~/.aws/credentials` and `~/.aws/config` (object_store does not
//! read them).
//!
//! Precedence follows the AWS CLI: a profile named on the command line
//! wins; otherwise `AWS_ACCESS_KEY_ID` and friends; otherwise the profile
//! `AWS_PROFILE` (or `default`) if the files have one; otherwise
//! object_store's own chain (web identity, ECS, instance metadata).
//! Profiles that get credentials by assuming a role, SSO or an external
//! process are refused with a hint: that would need the AWS SDK.
//!
//! The files are parsed here: the subset used (sections, `key = value`,
//! comments, nested blocks skipped) is a dozen lines, and an INI crate
//! would not know the AWS rules of section names anyway.

use std::collections::HashMap;
use std::path::PathBuf;

use object_store::aws::AmazonS3Builder;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// S3 settings given as mount options; `None`/`false`: the environment's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Region (`--aws-region`).
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store (`--aws-endpoint`).
    pub endpoint: Option<String>,
    /// Allow a plain-http endpoint (`--aws-allow-http`).
    pub allow_http: bool,
    /// Profile of the shared files (`--aws-profile`).
    pub profile: Option<String>,
}

static S3: Mutex<Option<S3Settings>> = Mutex::new(None);

/// Sets the S3 settings for clients built from now on.
pub fn configure_s3(s: S3Settings) {
    *S3.lock() = Some(s);
}

type Section = HashMap<String, String>;

/// The sections of an AWS shared file (empty if it cannot be read).
fn parse_file(text: &str) -> HashMap<String, Section> {
    let mut out: HashMap<String, Section> = HashMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        // Indented lines belong to a nested block (`s3 =` settings): skipped.
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            out.entry(name.clone()).or_default();
            cur = Some(name);
        } else if let (Some(sec), Some((k, v))) = (&cur, line.split_once('=')) {
            if let Some(s) = out.get_mut(sec) {
                s.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

fn aws_file(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws").join(name))
}

/// The settings of profile `name`: its section of the credentials file
/// over its section of the config file; `None` if neither has it.
fn profile(name: &str) -> Option<Section> {
    let read = |var, file| {
        aws_file(var, file)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| parse_file(&t))
            .unwrap_or_default()
    };
    let mut config = read("AWS_CONFIG_FILE", "config");
    let mut creds = read("AWS_SHARED_CREDENTIALS_FILE", "credentials");
    let from_config = config.remove(&format!("profile {name}")).or_else(|| {
        if name == "default" {
            config.remove("default")
        } else {
            None
        }
    });
    let from_creds = creds.remove(name);
    if from_config.is_none() && from_creds.is_none() {
        return None;
    }
    let mut s = from_config.unwrap_or_default();
    s.extend(from_creds.unwrap_or_default());
    Some(s)
}

fn env_set(k: &str) -> bool {
    std::env::var_os(k).is_some_and(|v| !v.is_empty())
}

/// `b` (built from the environment) with the mount options and the profile applied.
pub(crate) fn apply(mut b: AmazonS3Builder) -> Result<AmazonS3Builder> {
    let s = S3.lock().clone().unwrap_or_default();
    let named = s
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()));
    let explicit = named.is_some();
    let prof = match &named {
        Some(n) => Some(profile(n).ok_or_else(|| {
            Error::invalid(format!(
                "AWS profile {n:?} is in neither ~/.aws/credentials nor ~/.aws/config"
            ))
        })?),
        None => profile("default"),
    };
    let prof = prof.unwrap_or_default();
    let name = named.as_deref().unwrap_or("default");
    let has_keys = prof.contains_key("aws_access_key_id");
    // A profile named on the command line beats the environment's keys.
    let use_keys = has_keys && (s.profile.is_some() || !env_set("AWS_ACCESS_KEY_ID"));
    if use_keys {
        let secret = prof.get("aws_secret_access_key").ok_or_else(|| {
            Error::invalid(format!(
                "AWS profile {name:?} has aws_access_key_id but no aws_secret_access_key"
            ))
        })?;
        b = b
            .with_access_key_id(&prof["aws_access_key_id"])
            .with_secret_access_key(secret);
        if let Some(t) = prof.get("aws_session_token") {
            b = b.with_token(t);
        }
    } else if explicit
        && !env_set("AWS_ACCESS_KEY_ID")
        && [
            "role_arn",
            "credential_process",
            "sso_session",
            "sso_start_url",
        ]
        .iter()
        .any(|k| prof.contains_key(*k))
    {
        return Err(Error::unsupported(format!(
            "AWS profile {name:?} gets its credentials by role, SSO or an external process, \
             which vdiskfs does not do; export them (aws configure export-credentials \
             --profile {name} --format env)"
        )));
    }
    let env_region = env_set("AWS_REGION") || env_set("AWS_DEFAULT_REGION");
    if let Some(r) = &s.region {
        b = b.with_region(r);
    } else if let (false, Some(r)) = (env_region, prof.get("region")) {
        b = b.with_region(r);
    } else if !env_region {
        b = b.with_region("us-east-1");
    }
    let env_endpoint = env_set("AWS_ENDPOINT_URL") || env_set("AWS_ENDPOINT");
    if let Some(e) = &s.endpoint {
        b = b.with_endpoint(e);
    } else if let (false, Some(e)) = (env_endpoint, prof.get("endpoint_url")) {
        b = b.with_endpoint(e);
    }
    Ok(b)
}

/// True when plain http is allowed to the S3 endpoint.
pub(crate) fn allow_http() -> bool {
    S3.lock().as_ref().is_some_and(|s| s.allow_http)
        || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_files_are_parsed_into_sections() {
        let f = parse_file(
            "# comment\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\
             [profile minio]\nregion = eu-1\ns3 =\n  addressing_style = path\n\
             endpoint_url = http://h:9000\n; x\n",
        );
        assert_eq!(f["default"]["aws_access_key_id"], "AK");
        assert_eq!(f["default"]["aws_secret_access_key"], "SK");
        assert_eq!(f["profile minio"]["region"], "eu-1");
        assert_eq!(f["profile minio"]["endpoint_url"], "http://h:9000");
        assert!(!f["profile minio"].contains_key("addressing_style"));
    }
}
