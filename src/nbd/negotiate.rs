//! The handshake: fixed newstyle negotiation, from the server's greeting to
//! the export a client selects (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`).
//!
//! It runs over any `Read + Write` (a socket, or bytes in a test or fuzz
//! target). Every length a client sends is bounded before anything is
//! allocated; a malformed option gets `NBD_REP_ERR_INVALID`, a broken
//! framing (bad magic, oversized option, too many options) ends the
//! connection. With TLS required, only `STARTTLS` and `ABORT` are served
//! before the upgrade (the caller runs the TLS handshake between the two
//! halves of the haggling, see [`Step::StartTls`]).

use std::io::{self, Read, Write};

use super::proto::{self, *};
use super::Export;
use crate::endian::{be16_bytes, be32, be64, be64_bytes};

/// Largest option payload read; the longest legitimate one (a meta-context
/// request with a few queries) is far smaller.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// Options one client may send before it selects an export.
pub const MAX_OPTIONS: usize = 256;

/// Block size constraints advertised: any alignment works, 4 KiB is the
/// preferred unit, and one request carries at most this many bytes.
pub const MAX_REQUEST: u32 = 32 << 20;

/// What the client chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the export in the server's list.
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected, by id, ascending.
    pub contexts: Vec<u32>,
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// The export `name` selects (empty: the first, the default export).
pub fn find_export(exports: &[Export], name: &str) -> Option<usize> {
    if name.is_empty() {
        return (!exports.is_empty()).then_some(0);
    }
    exports.iter().position(|e| e.name == name)
}

/// Whether this connection speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is unsupported.
    Off,
    /// TLS is required and not started yet: every option other than
    /// `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD` (FORCEDTLS).
    Required,
    /// The session runs over TLS.
    Active,
}

/// What the option haggling ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The client selected an export.
    Selected(Negotiated),
    /// The client aborted.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the caller runs the TLS
    /// handshake, calls [`Negotiator::tls_started`] and goes on over TLS.
    StartTls,
}

/// The state of one handshake across the TLS upgrade.
#[derive(Debug)]
pub struct Negotiator {
    no_zeroes: bool,
    structured: bool,
    // Contexts selected, and the export they were selected for.
    contexts: Vec<u32>,
    contexts_for: Option<usize>,
    options_left: usize,
    tls: Tls,
}

/// The step of selecting export `idx` (by `NBD_OPT_EXPORT_NAME` or
/// `NBD_OPT_GO`): contexts chosen for another export do not carry over.
fn selected(
    idx: usize,
    structured: bool,
    contexts: &mut Vec<u32>,
    contexts_for: Option<usize>,
) -> Step {
    if contexts_for != Some(idx) {
        contexts.clear();
    }
    Step::Selected(Negotiated {
        export: idx,
        structured,
        contexts: std::mem::take(contexts),
    })
}

/// Runs the handshake without TLS. `Ok(None)`: the client aborted; `Err`:
/// it broke the protocol or went away.
pub fn negotiate<S: Read + Write>(s: &mut S, exports: &[Export]) -> io::Result<Option<Negotiated>> {
    let mut n = Negotiator::greet(s, Tls::Off)?;
    match n.options(s, exports)? {
        Step::Selected(neg) => Ok(Some(neg)),
        Step::Aborted => Ok(None),
        Step::StartTls => Err(protocol("TLS is off")),
    }
}

impl Negotiator {
    /// Sends the greeting and reads the client's flags. With TLS required,
    /// a client without fixed newstyle (which cannot start TLS) is refused.
    pub fn greet<S: Read + Write>(s: &mut S, tls: Tls) -> io::Result<Negotiator> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&be64_bytes(NBDMAGIC));
        hello.extend_from_slice(&be64_bytes(IHAVEOPT));
        hello.extend_from_slice(&be16_bytes(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.write_all(&hello)?;
        s.flush()?;
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4)?;
        let client_flags = be32(&b4, 0);
        if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(protocol("unknown client flags"));
        }
        if tls == Tls::Required && client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(protocol("TLS is required and needs fixed newstyle"));
        }
        Ok(Negotiator {
            no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
            structured: false,
            contexts: Vec::new(),
            contexts_for: None,
            options_left: MAX_OPTIONS,
            tls,
        })
    }

    /// Records that the TLS handshake succeeded.
    pub fn tls_started(&mut self) {
        self.tls = Tls::Active;
    }

    /// Handles options until the client selects an export, aborts, or
    /// starts TLS.
    pub fn options<S: Read + Write>(&mut self, s: &mut S, exports: &[Export]) -> io::Result<Step> {
        while self.options_left > 0 {
            self.options_left -= 1;
            if let Some(step) = self.option(s, exports)? {
                return Ok(step);
            }
        }
        Err(protocol("too many options"))
    }

    /// One option; `Some` when it ends the haggling.
    fn option<S: Read + Write>(
        &mut self,
        s: &mut S,
        exports: &[Export],
    ) -> io::Result<Option<Step>> {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        let magic = be64(&head, 0);
        if magic != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let option = be32(&head, 8);
        let len = be32(&head, 12);
        if len > MAX_OPTION_LEN {
            return Err(protocol("option payload too large"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut S, kind: u32, payload: &[u8]| -> io::Result<()> {
            s.write_all(&proto::option_reply(option, kind, payload))
        };
        if self.tls == Tls::Required {
            match option {
                OPT_STARTTLS if !data.is_empty() => {
                    reply(s, REP_ERR_INVALID, b"STARTTLS takes no data")?
                }
                OPT_STARTTLS => {
                    reply(s, REP_ACK, &[])?;
                    s.flush()?;
                    return Ok(Some(Step::StartTls));
                }
                // It cannot be answered with an error: hang up.
                OPT_EXPORT_NAME => return Err(protocol("TLS is required")),
                OPT_ABORT => {
                    let _ = reply(s, REP_ACK, &[]);
                    let _ = s.flush();
                    return Ok(Some(Step::Aborted));
                }
                _ => reply(s, REP_ERR_TLS_REQD, b"this server requires TLS (STARTTLS)")?,
            }
            s.flush()?;
            return Ok(None);
        }
        let no_zeroes = self.no_zeroes;
        let structured = &mut self.structured;
        let contexts = &mut self.contexts;
        let contexts_for = &mut self.contexts_for;
        let tls = self.tls;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| protocol("export name"))?;
                let idx = find_export(exports, &name).ok_or_else(|| protocol("no such export"))?;
                let e = &exports[idx];
                let mut r = Vec::with_capacity(134);
                r.extend_from_slice(&be64_bytes(e.size()));
                r.extend_from_slice(&be16_bytes(e.flags()));
                if !no_zeroes {
                    r.resize(r.len() + 124, 0);
                }
                s.write_all(&r)?;
                s.flush()?;
                return Ok(Some(selected(idx, *structured, contexts, *contexts_for)));
            }
            OPT_ABORT => {
                let _ = reply(s, REP_ACK, &[]);
                let _ = s.flush();
                return Ok(Some(Step::Aborted));
            }
            OPT_LIST if !data.is_empty() => reply(s, REP_ERR_INVALID, b"LIST takes no data")?,
            OPT_LIST => {
                for e in exports {
                    reply(s, REP_SERVER, &proto::server_entry(&e.name))?;
                }
                reply(s, REP_ACK, &[])?;
            }
            OPT_STARTTLS if tls == Tls::Active => reply(s, REP_ERR_INVALID, b"TLS is already on")?,
            OPT_STARTTLS => reply(s, REP_ERR_UNSUP, b"TLS is not configured on this server")?,
            OPT_INFO | OPT_GO => {
                let req = match proto::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(Malformed(m)) => {
                        reply(s, REP_ERR_INVALID, m.as_bytes())?;
                        s.flush()?;
                        return Ok(None);
                    }
                };
                let Some(idx) = find_export(exports, &req.name) else {
                    reply(s, REP_ERR_UNKNOWN, b"no such export")?;
                    s.flush()?;
                    return Ok(None);
                };
                let e = &exports[idx];
                reply(s, REP_INFO, &proto::info_export(e.size(), e.flags()))?;
                for r in &req.requests {
                    match *r {
                        INFO_NAME => reply(s, REP_INFO, &proto::info_text(INFO_NAME, &e.name))?,
                        INFO_DESCRIPTION => reply(
                            s,
                            REP_INFO,
                            &proto::info_text(INFO_DESCRIPTION, &e.description),
                        )?,
                        _ => {}
                    }
                }
                // Sent whether asked or not: the constraints are ones every
                // client meets (any alignment), so nothing breaks if ignored.
                reply(s, REP_INFO, &proto::info_block_size(1, 4096, MAX_REQUEST))?;
                reply(s, REP_ACK, &[])?;
                s.flush()?;
                if option == OPT_GO {
                    return Ok(Some(selected(idx, *structured, contexts, *contexts_for)));
                }
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                reply(s, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?
            }
            OPT_STRUCTURED_REPLY => {
                *structured = true;
                reply(s, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if !*structured {
                    reply(s, REP_ERR_INVALID, b"negotiate structured replies first")?;
                } else {
                    match proto::parse_meta_request(&data) {
                        Err(Malformed(m)) => reply(s, REP_ERR_INVALID, m.as_bytes())?,
                        Ok(req) => match find_export(exports, &req.export) {
                            None => reply(s, REP_ERR_UNKNOWN, b"no such export")?,
                            Some(idx) => {
                                let mut found: Vec<(u32, &str)> = Vec::new();
                                if req.queries.is_empty() && !set {
                                    found.extend(CONTEXTS);
                                }
                                for q in &req.queries {
                                    found.extend(proto::match_context(q, !set));
                                }
                                found.sort_unstable();
                                found.dedup();
                                for (id, name) in &found {
                                    reply(s, REP_META_CONTEXT, &proto::meta_context(*id, name))?;
                                }
                                reply(s, REP_ACK, &[])?;
                                if set {
                                    *contexts = found.iter().map(|(id, _)| *id).collect();
                                    *contexts_for = Some(idx);
                                }
                            }
                        },
                    }
                }
            }
            _ => reply(s, REP_ERR_UNSUP, b"option not supported")?,
        }
        s.flush()?;
        s.flush()?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endian::be32_bytes;

    /// Client bytes in, server bytes out.
    struct Pipe {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = be64_bytes(IHAVEOPT).to_vec();
        v.extend_from_slice(&be32_bytes(opt));
        v.extend_from_slice(&be32_bytes(data.len() as u32));
        v.extend_from_slice(data);
        v
    }

    /// The option reply types in `out`.
    fn reply_kinds(out: &[u8]) -> Vec<u32> {
        let mut kinds = Vec::new();
        let mut p = 0;
        while p + 20 <= out.len() {
            kinds.push(be32(out, p + 12));
            let len = be32(out, p + 16);
            p += 20 + len as usize;
        }
        kinds
    }

    fn pipe(bytes: Vec<u8>) -> Pipe {
        Pipe {
            input: std::io::Cursor::new(bytes),
            output: Vec::new(),
        }
    }

    #[test]
    fn tls_required_serves_only_starttls_and_abort_before_the_upgrade() {
        let mut input = be32_bytes(3).to_vec();
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_GO, &[0, 0, 0, 0, 0, 0]));
        input.extend(option(OPT_STARTTLS, b"x"));
        input.extend(option(OPT_STARTTLS, &[]));
        let mut p = pipe(input);
        let mut n = Negotiator::greet(&mut p, Tls::Required).unwrap();
        assert_eq!(n.options(&mut p, &[]).unwrap(), Step::StartTls);
        assert_eq!(
            reply_kinds(&p.output[18..]),
            [
                REP_ERR_TLS_REQD,
                REP_ERR_TLS_REQD,
                REP_ERR_TLS_REQD,
                REP_ERR_INVALID,
                REP_ACK
            ]
        );
        // Over TLS: options are served, a second STARTTLS is invalid.
        n.tls_started();
        let mut input = option(OPT_STARTTLS, &[]);
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_ABORT, &[]));
        let mut p = pipe(input);
        assert_eq!(n.options(&mut p, &[]).unwrap(), Step::Aborted);
        assert_eq!(reply_kinds(&p.output), [REP_ERR_INVALID, REP_ACK, REP_ACK]);
    }

    #[test]
    fn tls_required_hangs_up_on_export_name_and_old_clients() {
        let mut input = be32_bytes(3).to_vec();
        input.extend(option(OPT_EXPORT_NAME, b""));
        let mut p = pipe(input);
        let mut n = Negotiator::greet(&mut p, Tls::Required).unwrap();
        assert!(n.options(&mut p, &[]).is_err());
        assert!(p.output.len() == 18, "EXPORT_NAME before TLS was answered");
        let mut p = pipe(be32_bytes(0).to_vec());
        assert!(Negotiator::greet(&mut p, Tls::Required).is_err());
        // Without TLS, STARTTLS is unsupported and negotiation goes on.
        let mut input = be32_bytes(1).to_vec();
        input.extend(option(OPT_STARTTLS, &[]));
        input.extend(option(OPT_ABORT, &[]));
        let mut p = pipe(input);
        assert_eq!(negotiate(&mut p, &[]).unwrap(), None);
        assert_eq!(reply_kinds(&p.output[18..]), [REP_ERR_UNSUP, REP_ACK]);
    }
}
