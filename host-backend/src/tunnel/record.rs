//! TLS 1.3 record protection for the tunnel's data path, after rustls' handshake.
//!
//! rustls authenticates the peer and agrees the keys; then the connection's traffic secrets
//! are taken out of it ([`rustls::Connection::dangerous_extract_secrets`], the interface
//! rustls offers for kernel TLS) and records are sealed and opened here, in the driver's
//! own buffers: a record is decrypted in place where the socket read put it and its
//! plaintext goes straight to the endpoint. rustls' buffered reader copies every decrypted
//! record into a fresh heap buffer first (and its unbuffered API does the same in 0.23);
//! on a busy tunnel that copy was a third of the receiving driver's copying.
//!
//! The records are exactly RFC 8446's (section 5.2): outer type application_data, legacy
//! version 0x0303, the AEAD over the inner plaintext (content, then the content type) with
//! the 5-byte header as additional data and the IV XOR the 64-bit record sequence number
//! as nonce, so the peer could as well be rustls itself (the tests check both ways).
//! What this layer does not do, and why it need not:
//! - **Post-handshake messages** (KeyUpdate, NewSessionTicket): both ends are domsockd,
//!   which sends none (tickets are off in [`super::tls`]); a record of any inner type but
//!   application_data ends the connection, and the tunnel resumes on a new one.
//! - **Key updates**: instead of a KeyUpdate, a direction that reaches the AEAD's
//!   confidentiality limit (2^24 records for AES-GCM, as rustls counts) fails the
//!   connection, and the resume on a fresh one brings fresh keys. At full speed that is
//!   one reconnect per ~270 GB.
//! - **Padding**: none is sent; received padding is removed.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use std::io;

/// Record header: type, legacy version, length.
pub(super) const HEADER_LEN: usize = 5;
/// Largest plaintext of one record.
pub(super) const MAX_PLAINTEXT: usize = 1 << 14;
const TAG_LEN: usize = 16;
/// What sealing adds after a record's plaintext: the inner content type and the tag.
pub(super) const SEAL_OVERHEAD: usize = 1 + TAG_LEN;
/// Largest ciphertext RFC 8446 allows a peer to send (2^14 + 256).
pub(super) const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// One direction's key, IV, sequence number and record limit.
pub(super) struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    limit: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or IV.
        f.debug_struct("Direction").field("seq", &self.seq).finish()
    }
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (alg, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, 1u64 << 24)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, 1u64 << 24)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => return Err(bad("unsupported cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| bad("bad traffic key"))?;
        let iv: [u8; aead::NONCE_LEN] = iv.as_ref().try_into().map_err(|_| bad("bad IV"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The next record's nonce (RFC 8446 5.3); each sequence number is used once.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= self.limit {
            return Err(io::Error::other(
                "record limit of the traffic key reached (a new connection brings new keys)",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seals the record laid out at `rec`: `HEADER_LEN` bytes of room, the plaintext, then
    /// `SEAL_OVERHEAD` bytes of room (`rec.len()` is all of it).
    pub(super) fn seal(&mut self, rec: &mut [u8]) -> io::Result<()> {
        let plain = rec.len() - HEADER_LEN - SEAL_OVERHEAD;
        debug_assert!(plain <= MAX_PLAINTEXT);
        let len = (plain + SEAL_OVERHEAD) as u16;
        let header = [
            APPLICATION_DATA,
            LEGACY_VERSION[0],
            LEGACY_VERSION[1],
            (len >> 8) as u8,
            len as u8,
        ];
        rec[..HEADER_LEN].copy_from_slice(&header);
        let nonce = self.next_nonce()?;
        let (body, tag_room) = rec[HEADER_LEN..].split_at_mut(plain + 1);
        body[plain] = APPLICATION_DATA;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| io::Error::other("seal failed"))?;
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the record `rec` (header and ciphertext, exactly one record) in place and
    /// returns its application data.
    pub(super) fn open<'a>(&mut self, rec: &'a mut [u8]) -> io::Result<&'a [u8]> {
        let (header, body) = rec.split_at_mut(HEADER_LEN);
        let header: [u8; HEADER_LEN] = (&*header).try_into().map_err(|_| bad("short record"))?;
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| bad("record failed authentication"))?;
        // Inner plaintext: content, type, zero padding (RFC 8446 5.4).
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or_else(|| bad("record without a content type"))?;
        if plain[end] != APPLICATION_DATA {
            return Err(bad(
                "a post-handshake message (not supported on the tunnel)",
            ));
        }
        Ok(&plain[..end])
    }
}

/// Checks a record header and returns the length of its ciphertext.
pub(super) fn record_len(header: &[u8]) -> io::Result<usize> {
    if header[0] != APPLICATION_DATA || header[1..3] != LEGACY_VERSION {
        return Err(bad("not a TLS 1.3 application-data record"));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if !(SEAL_OVERHEAD..=MAX_CIPHERTEXT).contains(&len) {
        return Err(bad("record length out of range"));
    }
    Ok(len)
}

/// Both directions of one connection.
#[derive(Debug)]
pub(super) struct RecordLayer {
    pub tx: Direction,
    pub rx: Direction,
}

impl RecordLayer {
    pub(super) fn new(s: ExtractedSecrets) -> io::Result<Self> {
        Ok(Self {
            tx: Direction::new(s.tx)?,
            rx: Direction::new(s.rx)?,
        })
    }
}

/// Reads for rustls during the handshake one record at a time, so that it never takes a
/// byte past the record that completes the handshake: what follows is the peer's first
/// application data, and it must be left in the socket for [`RecordLayer`].
pub(super) struct RecordAtATime<'a, S> {
    pub sock: &'a mut S,
    header: [u8; HEADER_LEN],
    /// Header bytes not yet handed out.
    header_at: usize,
    /// Body bytes of the current record not yet read.
    left: usize,
}

impl<'a, S> RecordAtATime<'a, S> {
    pub(super) fn new(sock: &'a mut S) -> Self {
        Self {
            sock,
            header: [0; HEADER_LEN],
            header_at: HEADER_LEN,
            left: 0,
        }
    }
}

impl<S: io::Read> io::Read for RecordAtATime<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.header_at == HEADER_LEN && self.left == 0 {
            let mut got = 0;
            while got < HEADER_LEN {
                match self.sock.read(&mut self.header[got..])? {
                    0 if got == 0 => return Ok(0),
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => got += n,
                }
            }
            self.header_at = 0;
            self.left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        }
        if self.header_at < HEADER_LEN {
            let n = (HEADER_LEN - self.header_at).min(buf.len());
            buf[..n].copy_from_slice(&self.header[self.header_at..self.header_at + n]);
            self.header_at += n;
            return Ok(n);
        }
        let want = self.left.min(buf.len());
        let n = self.sock.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }
}

impl<S: io::Write> io::Write for RecordAtATime<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Direction, Direction) {
        let mk = || {
            Direction::new((
                7,
                ConnectionTrafficSecrets::Aes256Gcm {
                    key: rustls::crypto::cipher::AeadKey::from([9u8; 32]),
                    iv: rustls::crypto::cipher::Iv::from([3u8; 12]),
                },
            ))
            .unwrap()
        };
        (mk(), mk())
    }

    fn record(d: &mut Direction, plain: &[u8]) -> Vec<u8> {
        let mut rec = vec![0u8; HEADER_LEN];
        rec.extend_from_slice(plain);
        rec.resize(rec.len() + SEAL_OVERHEAD, 0);
        d.seal(&mut rec).unwrap();
        rec
    }

    #[test]
    fn sealed_records_open_in_order_and_tampering_fails() {
        let (mut tx, mut rx) = pair();
        let mut a = record(&mut tx, b"first");
        let mut b = record(&mut tx, &[0x5a; MAX_PLAINTEXT]);
        assert_eq!(record_len(&a).unwrap(), a.len() - HEADER_LEN);
        assert_eq!(b.len(), HEADER_LEN + MAX_PLAINTEXT + SEAL_OVERHEAD);
        assert_eq!(rx.open(&mut a).unwrap(), b"first");
        let mut flipped = b.clone();
        flipped[HEADER_LEN + 100] ^= 1;
        let mut rx2 = pair().1;
        rx2.seq = 8;
        assert!(rx2.open(&mut flipped).is_err(), "a flipped bit fails");
        assert_eq!(rx.open(&mut b).unwrap(), &[0x5a; MAX_PLAINTEXT][..]);
        // A replayed record is opened with the next sequence number: it fails.
        let mut again = record(&mut pair().0, b"first");
        assert!(rx.open(&mut again).is_err());
    }

    #[test]
    fn headers_out_of_range_are_refused() {
        assert!(record_len(&[22, 3, 3, 0, 40]).is_err(), "handshake type");
        assert!(record_len(&[23, 3, 1, 0, 40]).is_err(), "version");
        assert!(
            record_len(&[23, 3, 3, 0, 16]).is_err(),
            "shorter than a tag"
        );
        let too_long = (MAX_CIPHERTEXT + 1) as u16;
        assert!(record_len(&[23, 3, 3, (too_long >> 8) as u8, too_long as u8]).is_err());
        assert_eq!(record_len(&[23, 3, 3, 0, 17]).unwrap(), 17);
    }

    #[test]
    fn the_limit_ends_a_direction() {
        let (mut tx, _) = pair();
        tx.limit = 8;
        let mut rec = vec![0u8; HEADER_LEN + 1 + SEAL_OVERHEAD];
        tx.seal(&mut rec).unwrap();
        assert!(tx.seal(&mut rec).is_err(), "sequence 8 is past the limit");
    }

    /// The record layer against rustls itself: a real handshake (in memory) between
    /// rustls' client and server with the tunnel's TLS configuration, then the server's
    /// secrets taken out; the client stays rustls. Application data goes both ways.
    #[test]
    fn records_interoperate_with_rustls_both_ways() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("domsock-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::tunnel::certs::make_test_pki(&dir, ["a", "b"]).unwrap();
        let mat = |h: &str| {
            crate::tunnel::tls::TlsMaterial::load(
                &dir.join(format!("{h}.pem")),
                &dir.join(format!("{h}.key")),
                &dir.join("ca.pem"),
            )
            .unwrap()
        };
        let (a, b) = (mat("a"), mat("b"));
        let _ = std::fs::remove_dir_all(&dir);
        let name = rustls::pki_types::ServerName::try_from("b").unwrap();
        let mut client = rustls::ClientConnection::new(a.client.clone(), name).unwrap();
        let mut server = rustls::ServerConnection::new(b.server.clone()).unwrap();
        let mut wire = Vec::new();
        for _ in 0..10 {
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let mut r = &wire[..];
            while !r.is_empty() {
                server.read_tls(&mut r).unwrap();
                server.process_new_packets().unwrap();
            }
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            let mut r = &wire[..];
            while !r.is_empty() {
                client.read_tls(&mut r).unwrap();
                client.process_new_packets().unwrap();
            }
            wire.clear();
            if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
                break;
            }
        }
        assert!(!server.is_handshaking() && !client.is_handshaking());
        assert_eq!(
            server.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let mut ours = RecordLayer::new(server.dangerous_extract_secrets().unwrap()).unwrap();

        // rustls -> ours: 40 KiB in several records.
        let msg: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        client.writer().write_all(&msg).unwrap();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let end = at + HEADER_LEN + record_len(&wire[at..at + HEADER_LEN]).unwrap();
            got.extend_from_slice(ours.rx.open(&mut wire[at..end]).unwrap());
            at = end;
        }
        assert_eq!(got, msg);
        wire.clear();

        // ours -> rustls: a full record and a short one.
        let back: Vec<u8> = (0..(MAX_PLAINTEXT + 300) as u32)
            .map(|i| (i % 13) as u8)
            .collect();
        for chunk in back.chunks(MAX_PLAINTEXT) {
            let mut rec = vec![0u8; HEADER_LEN];
            rec.extend_from_slice(chunk);
            rec.resize(rec.len() + SEAL_OVERHEAD, 0);
            ours.tx.seal(&mut rec).unwrap();
            wire.extend_from_slice(&rec);
        }
        let mut r = &wire[..];
        while !r.is_empty() {
            client.read_tls(&mut r).unwrap();
            client.process_new_packets().unwrap();
        }
        let mut got = vec![0u8; back.len() + 10];
        let mut n = 0;
        while let Ok(k) = client.reader().read(&mut got[n..]) {
            if k == 0 {
                break;
            }
            n += k;
        }
        assert_eq!(&got[..n], &back[..]);
    }

    #[test]
    fn handshake_reads_stop_at_record_boundaries() {
        use std::io::Read;
        let mut wire: &[u8] = &[23, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 0, 1, 9];
        let mut r = RecordAtATime::new(&mut wire);
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).unwrap(), 5);
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert_eq!(r.read(&mut buf).unwrap(), 5);
        assert_eq!(r.read(&mut buf).unwrap(), 1);
        assert_eq!(r.read(&mut buf).unwrap(), 0, "EOF at a boundary");
    }
}
