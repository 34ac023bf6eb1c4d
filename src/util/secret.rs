//! Passphrases in memory: a buffer wiped when dropped, never printed.
//! A hand-written wipe (`std::ptr::write_volatile` per byte and a
//! compiler fence) rather than the `zeroize` crate: it is the one thing
//! needed from it, a dozen lines (see ARCHITECTURE "Why hand-written").

use anyhow::{Result, bail};

/// A passphrase is at most this long: cryptsetup's own limit for a typed
/// one (512 characters); anything longer is refused, not cut.
pub const MAX_PASSPHRASE: usize = 512;

/// A passphrase in memory: overwritten with zeros when dropped (volatile
/// writes, so the compiler cannot drop the wipe as a dead store), never
/// printed (`Debug` shows its length only), never cloned implicitly.
pub struct Secret(Vec<u8>);

impl Secret {
    /// Takes `bytes` (its buffer is reused, not copied). Refused when
    /// empty or longer than `MAX_PASSPHRASE`.
    pub fn new(bytes: Vec<u8>) -> Result<Secret> {
        let s = Secret(bytes);
        if s.0.is_empty() {
            bail!("the passphrase is empty");
        }
        if s.0.len() > MAX_PASSPHRASE {
            bail!("the passphrase is longer than {MAX_PASSPHRASE} bytes");
        }
        Ok(s)
    }
    /// A passphrase file's content: one trailing newline (an editor's, or
    /// `echo`'s) is not part of it, as when it is typed.
    pub fn from_file_bytes(mut bytes: Vec<u8>) -> Result<Secret> {
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            wipe_spare(&mut bytes);
        }
        Secret::new(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Equal in constant time for equal lengths (the two entries of a new
    /// passphrase).
    pub fn same_as(&self, other: &Secret) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    }
}

/// Zero the bytes past `len` up to the capacity (what `pop`/`truncate`
/// left behind).
fn wipe_spare(v: &mut Vec<u8>) {
    let spare = v.spare_capacity_mut();
    for b in spare {
        // SAFETY: a valid, aligned pointer into the Vec's own allocation.
        unsafe { std::ptr::write_volatile(b.as_mut_ptr(), 0) };
    }
}

/// Overwrite every byte of `buf` (a buffer a secret passed through).
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
        wipe_spare(&mut self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked_wiped_and_never_printed() {
        assert!(Secret::new(vec![]).is_err());
        assert!(Secret::new(vec![b'a'; MAX_PASSPHRASE + 1]).is_err());
        assert!(Secret::new(vec![b'a'; MAX_PASSPHRASE]).is_ok());
        let s = Secret::from_file_bytes(b"hunter2\n".to_vec()).unwrap();
        assert_eq!(s.expose(), b"hunter2");
        assert_eq!(format!("{s:?}"), "Secret(7 bytes)");
        assert!(
            Secret::from_file_bytes(b"\n".to_vec()).is_err(),
            "a lone newline is empty"
        );
        // only one newline is taken off: the rest is the passphrase
        assert_eq!(
            Secret::from_file_bytes(b"a\n\n".to_vec()).unwrap().expose(),
            b"a\n"
        );
        let a = Secret::new(b"same".to_vec()).unwrap();
        assert!(a.same_as(&Secret::new(b"same".to_vec()).unwrap()));
        assert!(!a.same_as(&Secret::new(b"sama".to_vec()).unwrap()));
        assert!(!a.same_as(&Secret::new(b"same!".to_vec()).unwrap()));
        // the wipe itself
        let mut buf = *b"topsecret";
        wipe(&mut buf);
        assert_eq!(buf, [0u8; 9]);
        let mut v = b"abc\n".to_vec();
        v.pop();
        wipe_spare(&mut v);
        // SAFETY: reading the byte past len inside the capacity, written just above
        let past = unsafe { *v.as_ptr().add(3) };
        assert_eq!(past, 0);
    }
}
