//! The LUKS2 binary header, read without unlocking anything and without
//! cryptsetup (the initramfs finds the `persistence` volume by its label
//! before it asks for a passphrase). Untrusted bytes: every field checked,
//! no slicing by on-disk values. The header's SHA-256 is not checked here
//! (no hash crate in the early-boot binary): the label is where to look,
//! and cryptsetup, which checks the checksum and the JSON, decides
//! whether it is a volume (`cryptsetup::dump`, `open`).
//!
//! Layout (LUKS2 on-disk format, cryptsetup `docs/on-disk-format-luks2.pdf`):
//! magic `LUKS\xba\xbe` (the secondary copy `SKUL\xba\xbe`) at 0, version
//! u16 BE at 6 (2), hdr_size u64 BE at 8 (binary header + JSON area, one of
//! 16 KiB..4 MiB), seqid u64 BE at 16, label 48 bytes at 24 (NUL-padded),
//! checksum algorithm 32 bytes at 72, salt at 104, uuid 40 bytes at 168,
//! subsystem at 208, hdr_offset u64 BE at 256 (0 for the primary copy, the
//! secondary's own offset for it).

use serde::Serialize;
use std::io::{self, Read, Seek, SeekFrom};

pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
pub const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// The bytes of the binary header we read.
pub const HEADER_LEN: usize = 512;
/// The sizes a LUKS2 header (binary part + JSON) may have: where the
/// secondary copy may start.
pub const HDR_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Luks2Header {
    pub label: String,
    pub uuid: String,
    pub hdr_size: u64,
    pub seqid: u64,
    /// Read from the secondary copy (the primary one unreadable).
    pub secondary: bool,
}

fn be64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// A NUL-terminated text field of `len` bytes at `o`: printable ASCII up
/// to the first NUL, zeros after it; anything else is not a header we use.
fn field(b: &[u8], o: usize, len: usize) -> Option<String> {
    let f = b.get(o..o + len)?;
    let end = f.iter().position(|&c| c == 0).unwrap_or(len);
    if end == len || !f[end..].iter().all(|&c| c == 0) {
        return None;
    }
    let t = &f[..end];
    t.iter()
        .all(|c| c.is_ascii_graphic() || *c == b' ')
        .then(|| String::from_utf8_lossy(t).into_owned())
}

/// Parse a LUKS2 binary header copy found at byte `at` of its device
/// (`at` 0: the primary one).
pub fn parse_header(b: &[u8], at: u64) -> Option<Luks2Header> {
    if b.len() < HEADER_LEN {
        return None;
    }
    let magic = if at == 0 { MAGIC } else { MAGIC_SECONDARY };
    if &b[0..6] != magic || u16::from_be_bytes([b[6], b[7]]) != 2 {
        return None;
    }
    let hdr_size = be64(b, 8)?;
    if !HDR_SIZES.contains(&hdr_size) || be64(b, 256)? != at {
        return None;
    }
    Some(Luks2Header {
        label: field(b, 24, 48)?,
        uuid: field(b, 168, 40)?,
        hdr_size,
        seqid: be64(b, 16)?,
        secondary: at != 0,
    })
}

fn read_at<R: Read + Seek>(r: &mut R, off: u64, buf: &mut [u8]) -> io::Result<bool> {
    r.seek(SeekFrom::Start(off))?;
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(true)
}

/// The LUKS2 header at the start of `r`: the primary copy, else the
/// secondary one at any of the sizes the format allows (the primary copy
/// overwritten, as cryptsetup itself recovers it).
pub fn probe<R: Read + Seek>(r: &mut R) -> io::Result<Option<Luks2Header>> {
    let mut b = [0u8; HEADER_LEN];
    if read_at(r, 0, &mut b)? {
        if let Some(h) = parse_header(&b, 0) {
            return Ok(Some(h));
        }
        if &b[0..6] != MAGIC && b.iter().any(|&c| c != 0) {
            // something else starts here (ext4, a filesystem of another
            // kind): a leftover secondary header after it is not a volume
            return Ok(None);
        }
    }
    for at in HDR_SIZES {
        if read_at(r, at, &mut b)?
            && let Some(h) = parse_header(&b, at)
        {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) fn synthetic(label: &str, at: u64) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0..6].copy_from_slice(if at == 0 { MAGIC } else { MAGIC_SECONDARY });
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    b[8..16].copy_from_slice(&(16u64 << 10).to_be_bytes());
    b[16..24].copy_from_slice(&7u64.to_be_bytes());
    b[24..24 + label.len()].copy_from_slice(label.as_bytes());
    b[72..78].copy_from_slice(b"sha256");
    let u = b"7b413f55-e96b-460c-bf07-05eaf40a35cc";
    b[168..168 + u.len()].copy_from_slice(u);
    b[256..264].copy_from_slice(&at.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn label_and_uuid_of_a_header() {
        let h = parse_header(&synthetic("persistence", 0), 0).unwrap();
        assert_eq!(h.label, "persistence");
        assert_eq!(h.uuid, "7b413f55-e96b-460c-bf07-05eaf40a35cc");
        assert_eq!((h.hdr_size, h.seqid, h.secondary), (16384, 7, false));
        // a label filling all 48 bytes has no NUL: not a header we use
        let mut b = synthetic("", 0);
        b[24..72].fill(b'a');
        assert_eq!(parse_header(&b, 0), None);
        // version 1 (LUKS1), a wrong hdr_offset, an odd hdr_size
        let mut b = synthetic("persistence", 0);
        b[7] = 1;
        assert_eq!(parse_header(&b, 0), None);
        let mut b = synthetic("persistence", 0);
        b[263] = 1;
        assert_eq!(parse_header(&b, 0), None);
        let mut b = synthetic("persistence", 0);
        b[8..16].copy_from_slice(&12345u64.to_be_bytes());
        assert_eq!(parse_header(&b, 0), None);
        // bytes after the label's NUL
        let mut b = synthetic("persistence", 0);
        b[50] = b'x';
        assert_eq!(parse_header(&b, 0), None);
    }

    #[test]
    fn the_secondary_copy_when_the_primary_is_gone() {
        let mut img = vec![0u8; 64 << 10];
        img[16 << 10..(16 << 10) + HEADER_LEN].copy_from_slice(&synthetic("persistence", 16 << 10));
        let h = probe(&mut Cursor::new(img.clone())).unwrap().unwrap();
        assert!(h.secondary && h.label == "persistence");
        // a secondary copy's magic at offset 0 is not a primary one
        assert_eq!(parse_header(&synthetic("persistence", 16 << 10), 0), None);
        // after a filesystem made over the volume: not a volume any more
        img[0] = 0x53;
        assert_eq!(probe(&mut Cursor::new(img)).unwrap(), None);
        assert_eq!(probe(&mut Cursor::new(vec![0u8; 100])).unwrap(), None);
    }

    #[test]
    fn hostile_bytes_never_panic_and_never_invent_a_label() {
        // seeded mutations of a real-looking header: whatever parses has a
        // label of printable ASCII within 48 bytes and a known size
        let base = synthetic("persistence", 0);
        let mut x: u64 = 0x2545F4914F6CDD1D;
        let mut parsed = 0;
        for round in 0..20000 {
            let mut b = base.clone();
            for _ in 0..(1 + round % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 40) as u8;
            }
            if round % 97 == 0 {
                b.truncate((x as usize) % HEADER_LEN);
            }
            if let Some(h) = parse_header(&b, 0) {
                parsed += 1;
                assert!(h.label.len() < 48 && h.label.bytes().all(|c| (0x20..0x7f).contains(&c)));
                assert!(HDR_SIZES.contains(&h.hdr_size));
            }
            let _ = probe(&mut Cursor::new(b));
        }
        assert!(
            parsed > 0,
            "some mutations leave a valid header (outside the checked fields)"
        );
        // random bytes: nothing
        for _ in 0..2000 {
            let b: Vec<u8> = (0..HEADER_LEN)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert_eq!(parse_header(&b, 0), None);
        }
    }
}
