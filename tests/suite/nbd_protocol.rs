//! The NBD server against hostile and broken clients, over a raw socket:
//! malformed negotiation, bad magic, oversized and unknown requests, reads
//! past the end, clients vanishing mid-request — each gets an error reply
//! or a disconnect, and the server keeps serving everyone else. Plus a few
//! thousand random and mutated client byte streams through the same code
//! the fuzz target drives (`vdiskfs::fuzzing::nbd_client`).

use crate::common;

use common::nbd::{Raw, Served, Wire};
use common::rng::Rng;

const SIZE: usize = 4 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::write(&p, Rng::new(7).bytes(SIZE)).unwrap();
    p
}

/// Connects, negotiates structured replies and selects `disk`.
fn session(s: &Served) -> Raw {
    let mut c = Raw::connect(&s.socket);
    c.send(&Wire::default().hello().structured().go("disk").0);
    assert_eq!(c.option_replies(), vec![1]);
    let kinds = c.option_replies();
    assert_eq!(kinds.last(), Some(&1), "GO failed: {kinds:?}");
    c
}

/// Reads one structured chunk: (flags, type, cookie, payload).
fn chunk(c: &mut Raw) -> (u16, u16, u64, Vec<u8>) {
    let h = c.read(20);
    assert_eq!(
        &h[..4],
        &0x668e_33efu32.to_be_bytes(),
        "not a structured reply"
    );
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    (flags, kind, cookie, c.read(len as usize))
}

/// Reads one reply with the error a structured error chunk or simple reply carries.
fn reply_error(c: &mut Raw) -> (u64, u32) {
    let h = c.read(4);
    if h == 0x6744_6698u32.to_be_bytes() {
        let rest = c.read(12);
        return (
            u64::from_be_bytes(rest[4..12].try_into().unwrap()),
            u32::from_be_bytes(rest[..4].try_into().unwrap()),
        );
    }
    assert_eq!(h, 0x668e_33efu32.to_be_bytes());
    let rest = c.read(16);
    let kind = u16::from_be_bytes([rest[2], rest[3]]);
    let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
    let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
    let p = c.read(len as usize);
    assert_eq!(kind, 0x8001, "expected an error chunk");
    (cookie, u32::from_be_bytes(p[..4].try_into().unwrap()))
}

/// A healthy client still reads correct data.
fn still_serves(s: &Served, data: &[u8]) {
    let mut c = session(s);
    c.send(&Wire::default().request(0, 0, 42, 4096, 8192, &[]).0);
    let (flags, kind, cookie, p) = chunk(&mut c);
    assert_eq!((flags & 1, kind, cookie), (1, 1, 42));
    assert_eq!(&p[8..], &data[4096..4096 + 8192]);
}

#[test]
fn hostile_clients_get_errors_or_disconnects_and_others_are_served() {
    let dir = common::scratch();
    let img = image(dir.path());
    let data = std::fs::read(&img).unwrap();
    let s = Served::new(&[&img], &["--format", "raw"]);

    // Unknown client flags: disconnect.
    let mut c = Raw::connect(&s.socket);
    c.send(&0xffu32.to_be_bytes());
    assert!(c.closed(), "unknown client flags");

    // Bad option magic: disconnect.
    let mut c = Raw::connect(&s.socket);
    c.send(&Wire::default().hello().0);
    c.send(b"NOTAMAGIC_______");
    assert!(c.closed(), "bad option magic");

    // An option payload far beyond any real one: disconnect, nothing read.
    let mut c = Raw::connect(&s.socket);
    let mut w = Wire::default().hello().0;
    w.extend_from_slice(b"IHAVEOPT");
    w.extend_from_slice(&7u32.to_be_bytes());
    w.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&w);
    assert!(c.closed(), "oversized option");

    // Malformed GO, unknown export, unknown option, meta context before
    // structured replies: error replies, the session goes on.
    let mut c = Raw::connect(&s.socket);
    c.send(&Wire::default().hello().option(7, &[0, 0, 0, 9, b'x']).0);
    assert_eq!(c.option_replies(), vec![0x8000_0003]);
    c.send(&Wire::default().go("nosuch").0);
    assert_eq!(c.option_replies(), vec![0x8000_0006]);
    c.send(&Wire::default().option(99, b"junk").0);
    assert_eq!(c.option_replies(), vec![0x8000_0001]);
    c.send(&Wire::default().meta("disk").0);
    assert_eq!(c.option_replies(), vec![0x8000_0003]);
    c.send(&Wire::default().option(3, &[]).0);
    assert_eq!(c.option_replies(), vec![2, 1], "LIST: one export then ACK");
    c.send(&Wire::default().option(2, &[]).0);
    assert_eq!(c.option_replies(), vec![1], "ABORT is acknowledged");
    assert!(c.closed());

    // A client that never finishes the handshake is dropped (10 s timeout)
    // without holding anyone else up.
    let mut idle = Raw::connect(&s.socket);
    still_serves(&s, &data);

    // Transmission: unknown command, read past the end, zero length, a
    // write to a read-only export, block status without a context: errors
    // by cookie, the connection stays.
    let mut c = session(&s);
    c.send(&Wire::default().request(0, 77, 1, 0, 512, &[]).0);
    assert_eq!(reply_error(&mut c), (1, 22));
    c.send(
        &Wire::default()
            .request(0, 0, 2, SIZE as u64 - 512, 1024, &[])
            .0,
    );
    assert_eq!(reply_error(&mut c), (2, 22));
    c.send(&Wire::default().request(0, 0, 3, u64::MAX - 10, 512, &[]).0);
    assert_eq!(reply_error(&mut c), (3, 22));
    c.send(&Wire::default().request(0, 0, 4, 0, 0, &[]).0);
    assert_eq!(reply_error(&mut c), (4, 22));
    c.send(&Wire::default().request(0, 1, 5, 0, 4, b"abcd").0);
    assert_eq!(reply_error(&mut c), (5, 1));
    c.send(&Wire::default().request(0, 7, 6, 0, 4096, &[]).0);
    assert_eq!(reply_error(&mut c), (6, 22));
    // An oversized read: EOVERFLOW, and the session continues.
    c.send(&Wire::default().request(0, 0, 7, 0, 64 << 20, &[]).0);
    assert_eq!(reply_error(&mut c), (7, 75));
    c.send(&Wire::default().request(0, 0, 8, 0, 512, &[]).0);
    let (_, kind, cookie, p) = chunk(&mut c);
    assert_eq!((kind, cookie), (1, 8));
    assert_eq!(&p[8..], &data[..512]);
    // An oversized write: EOVERFLOW then disconnect (its payload cannot be skipped).
    c.send(&Wire::default().request(0, 1, 9, 0, 64 << 20, &[]).0);
    assert_eq!(reply_error(&mut c), (9, 75));
    assert!(c.closed(), "oversized write");

    // Bad request magic: disconnect.
    let mut c = session(&s);
    c.send(&[0xde; 28]);
    assert!(c.closed(), "bad request magic");

    // Gone mid-request (header of a write, half its payload), and gone
    // with reads in flight.
    let mut c = session(&s);
    let mut w = Wire::default().request(0, 1, 10, 0, 1 << 20, &[]).0;
    w.extend_from_slice(&[1u8; 4096]);
    c.send(&w);
    drop(c);
    let mut c = session(&s);
    for i in 0..16 {
        c.send(&Wire::default().request(0, 0, i, 0, 1 << 20, &[]).0);
    }
    drop(c);

    still_serves(&s, &data);
    assert!(idle.closed(), "the idle client was not dropped");
    let (status, err) = s.stop();
    assert!(status.success(), "server exit {status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        data,
        "read-only export changed"
    );
}

#[test]
fn requests_are_answered_out_of_order_by_cookie() {
    let dir = common::scratch();
    let img = image(dir.path());
    let data = std::fs::read(&img).unwrap();
    let s = Served::new(&[&img], &["--format", "raw"]);
    let mut c = session(&s);
    let mut w = Wire::default();
    for i in 0..64u64 {
        w = w.request(0, 0, 1000 + i, i * 65536, 4096 + i as u32, &[]);
    }
    c.send(&w.0);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 64 {
        let (flags, kind, cookie, p) = chunk(&mut c);
        assert_eq!((flags & 1, kind), (1, 1));
        let i = cookie - 1000;
        let off = (i * 65536) as usize;
        assert_eq!(
            &p[8..],
            &data[off..off + 4096 + i as usize],
            "cookie {cookie}"
        );
        assert!(seen.insert(cookie));
    }
}

/// A valid session's bytes: options, then a mix of requests.
fn valid_stream(rng: &mut Rng) -> Vec<u8> {
    let export = if rng.below(2) == 0 { "rw" } else { "ro" };
    let mut w = Wire::default().hello();
    if rng.below(4) != 0 {
        w = w.structured().meta(export);
    }
    w = w.option(3, &[]).go(export);
    for i in 0..rng.below(12) {
        let kind = [0u16, 1, 3, 4, 6, 7, 2, 9][rng.below(8) as usize];
        let off = rng.below(1 << 20);
        let len = 1 + rng.below(70_000) as u32;
        let data = if kind == 1 {
            vec![0x33; len as usize]
        } else {
            Vec::new()
        };
        w = w.request(rng.below(32) as u16, kind, i, off, len, &data);
    }
    w.0
}

#[test]
fn random_and_mutated_client_streams_never_panic_or_hang() {
    let mut rng = Rng::new(19);
    let started = std::time::Instant::now();
    for n in 0..3000 {
        let mut s = valid_stream(&mut rng);
        match n % 4 {
            0 => {}
            1 => {
                for _ in 0..=rng.below(8) {
                    let i = rng.below(s.len() as u64) as usize;
                    s[i] = rng.below(256) as u8;
                }
            }
            2 => s.truncate(rng.below(s.len() as u64) as usize),
            _ => {
                let n = rng.below(600) as usize;
                s = rng.bytes(n)
            }
        }
        vdiskfs::fuzzing::nbd_client(&s);
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(300),
        "3000 client streams took {:?}",
        started.elapsed()
    );
}
