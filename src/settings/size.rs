//! Sizes as users write them: `256M`, `1G`, `512K`, `4096`, `75%`.

use serde::Serialize;
use std::fmt;

/// A size as written on the command line or in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Bytes(u64),
    /// Percent of a total (RAM for tmpfs and the RAM overlay).
    Percent(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a size (examples: 256M, 1G, 512K, 75%)")]
pub struct SizeError(pub String);

impl Size {
    pub fn parse(s: &str) -> Result<Size, SizeError> {
        let err = || SizeError(s.to_string());
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: u8 = p.parse().map_err(|_| err())?;
            if v == 0 || v > 100 {
                return Err(err());
            }
            return Ok(Size::Percent(v));
        }
        let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            None => (t, 1u64),
            Some((i, _)) => {
                let unit = t[i..].to_ascii_uppercase();
                let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    "T" => 1 << 40,
                    _ => return Err(err()),
                };
                (&t[..i], mult)
            }
        };
        let v: u64 = num.parse().map_err(|_| err())?;
        let bytes = v.checked_mul(mult).ok_or_else(err)?;
        if bytes == 0 {
            return Err(err());
        }
        Ok(Size::Bytes(bytes))
    }

    /// Bytes for a given total, clamped to the total (a tmpfs larger than
    /// the machine's RAM is a footgun, not a feature).
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            Size::Bytes(b) => b.min(total),
            Size::Percent(p) => total / 100 * u64::from(p),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Size::Percent(p) => write!(f, "{p}%"),
            Size::Bytes(b) => f.write_str(&human(b)),
        }
    }
}

/// `1.5G`-style rendering; exact units when they divide evenly.
pub fn human(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (u, m) in UNITS {
        if b >= m {
            return if b.is_multiple_of(m) {
                format!("{}{u}", b / m)
            } else {
                format!("{:.1}{u}", b as f64 / m as f64)
            };
        }
    }
    format!("{b}")
}

pub const MIB: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_percent() {
        assert_eq!(Size::parse("256M"), Ok(Size::Bytes(256 * MIB)));
        assert_eq!(Size::parse("1G"), Ok(Size::Bytes(1 << 30)));
        assert_eq!(Size::parse("512k"), Ok(Size::Bytes(512 << 10)));
        assert_eq!(Size::parse("2GiB"), Ok(Size::Bytes(2 << 30)));
        assert_eq!(Size::parse("4096"), Ok(Size::Bytes(4096)));
        assert_eq!(Size::parse("75%"), Ok(Size::Percent(75)));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "M",
            "12Q",
            "0",
            "0%",
            "101%",
            "-5M",
            "1.5G",
            "99999999999999999999G",
        ] {
            assert!(Size::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn resolves_and_clamps() {
        assert_eq!(Size::Percent(50).resolve(1000), 500);
        assert_eq!(Size::Bytes(5 << 30).resolve(1 << 30), 1 << 30);
        assert_eq!(human(64 * MIB), "64M");
        assert_eq!(human(3 * MIB / 2), "1.5M");
    }
}
