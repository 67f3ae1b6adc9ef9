//! Byte sizes as users write them on the command line: `4096`, `512K`, `2MiB`, `3G`.
//!
//! Units are binary (K = 1024). The VMM parses its memory size with the same functions.

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size: give a number of bytes, optionally with a K/M/G/T suffix (e.g. 512M)")]
    Empty,
    #[error("size {input:?} does not start with a whole number: write e.g. 1536M instead of 1.5G")]
    NotANumber { input: String },
    #[error("size {input:?} has unknown unit {unit:?}: use K, M, G or T (or KiB, MiB, GiB, TiB), binary multiples")]
    UnknownUnit { input: String, unit: String },
    #[error("size {input:?} does not fit in 64 bits (at most {max} bytes)", max = u64::MAX)]
    Overflow { input: String },
}

const UNITS: [(char, u32); 4] = [('K', 10), ('M', 20), ('G', 30), ('T', 40)];

/// Parses a byte count with an optional binary unit, case-insensitively: `K`, `KiB`, `M`, `MiB`,
/// `G`, `GiB`, `T`, `TiB`, or a bare `B`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let input = s.trim();
    if input.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    let (digits, unit) = input.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotANumber {
            input: input.to_string(),
        });
    }
    let overflow = || SizeError::Overflow {
        input: input.to_string(),
    };
    let number: u64 = digits.parse().map_err(|_| overflow())?;
    let shift = unit_shift(unit).ok_or_else(|| {
        if unit.starts_with('.') {
            SizeError::NotANumber {
                input: input.to_string(),
            }
        } else {
            SizeError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            }
        }
    })?;
    number.checked_mul(1u64 << shift).ok_or_else(overflow)
}

/// The power of two a unit stands for, or None if it is not one we accept.
fn unit_shift(unit: &str) -> Option<u32> {
    let upper = unit.to_ascii_uppercase();
    if upper.is_empty() || upper == "B" {
        return Some(0);
    }
    let mut chars = upper.chars();
    let letter = chars.next()?;
    let rest = chars.as_str();
    let (_, shift) = UNITS.iter().find(|(l, _)| *l == letter)?;
    matches!(rest, "" | "IB").then_some(*shift)
}

/// Formats a byte count in the largest unit that divides it exactly: `3G`, `2M`, `1536K`, `4097`.
///
/// The result parses back to the same value with [`parse_size`].
pub fn format_size(bytes: u64) -> String {
    if bytes != 0 {
        for (letter, shift) in UNITS.iter().rev() {
            if bytes % (1u64 << shift) == 0 {
                return format!("{}{letter}", bytes >> shift);
            }
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_bytes_and_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("7b"), Ok(7));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("2mib"), Ok(2 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1TIB"), Ok(1 << 40));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("  "), Err(SizeError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeError::NotANumber { .. })));
        assert!(matches!(
            parse_size("-1"),
            Err(SizeError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_size("1.5G"),
            Err(SizeError::NotANumber { .. })
        ));
        for bad in ["1X", "1KB", "1GB", "1Gi", "1 G", "1P", "1GiBs"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::UnknownUnit { .. })),
                "{bad} should be an unknown unit"
            );
        }
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::Overflow { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow { .. })
        ));
        assert_eq!(parse_size("16777215T"), Ok(16777215 << 40));
    }

    #[test]
    fn messages_name_the_input() {
        let msg = parse_size("1.5G").unwrap_err().to_string();
        assert!(msg.contains("\"1.5G\"") && msg.contains("1536M"), "{msg}");
        let msg = parse_size("4Q").unwrap_err().to_string();
        assert!(msg.contains("\"Q\""), "{msg}");
    }

    #[test]
    fn formats_in_largest_exact_unit() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(2 << 20), "2M");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(5 << 40), "5T");
        assert_eq!(format_size(1 << 50), "1024T");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(bytes in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }

        #[test]
        fn scaled_values_round_trip(n in 0u64..1 << 20, unit in 0usize..4) {
            let shift = UNITS[unit].1;
            let bytes = n << shift;
            prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
            prop_assert!(format_size(bytes).len() <= 20);
        }
    }
}
