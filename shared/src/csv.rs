//! One CSV record split as Go's `encoding/csv` splits it: buildx reads
//! `--output`, `--secret`, `--cache-from`/`--cache-to` and BuildKit reads
//! `RUN --mount` options with it, so braid reads them all with this.

/// Why a record does not split (Go's own wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsvError {
    #[error("extraneous or missing \" in quoted-field")]
    Quoted,
    #[error("bare \" in non-quoted-field")]
    BareQuote,
}

/// Splits one CSV record as Go's `encoding/csv` (buildx's parser) does:
/// fields separated by `,`; a field that starts with `"` is quoted, `""`
/// inside it is one `"`; a `"` elsewhere in an unquoted field is an error.
pub fn fields(record: &str) -> Result<Vec<String>, CsvError> {
    let mut fields = Vec::new();
    let mut rest = record;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut field = String::new();
            let mut chars = quoted.char_indices();
            let after = loop {
                match chars.next() {
                    Some((i, '"')) => {
                        if quoted[i + 1..].starts_with('"') {
                            field.push('"');
                            chars.next();
                        } else {
                            break &quoted[i + 1..];
                        }
                    }
                    Some((_, c)) => field.push(c),
                    None => return Err(CsvError::Quoted),
                }
            };
            fields.push(field);
            match after.strip_prefix(',') {
                Some(next) => rest = next,
                None if after.is_empty() => return Ok(fields),
                None => return Err(CsvError::Quoted),
            }
        } else {
            let (field, next) = match rest.split_once(',') {
                Some((f, n)) => (f, Some(n)),
                None => (rest, None),
            };
            if field.contains('"') {
                return Err(CsvError::BareQuote);
            }
            fields.push(field.to_owned());
            match next {
                Some(n) => rest = n,
                None => return Ok(fields),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn csv_splits_like_go() {
        assert_eq!(fields("a,b").unwrap(), ["a", "b"]);
        assert_eq!(fields("\"a,b\",c").unwrap(), ["a,b", "c"]);
        assert_eq!(fields("\"say \"\"hi\"\"\"").unwrap(), ["say \"hi\""]);
        assert_eq!(fields("a,,").unwrap(), ["a", "", ""]);
        assert_eq!(fields("\"type=registry\",\"ref=r/a\"").unwrap(), ["type=registry", "ref=r/a"]);
        assert!(fields("a\"b").unwrap_err().to_string().contains("bare \""));
        assert!(fields("\"ab").unwrap_err().to_string().contains("extraneous or missing"));
        assert!(fields("\"a\"b").unwrap_err().to_string().contains("extraneous or missing"));
    }

    proptest::proptest! {
        /// Any fields, written as Go's csv.Writer writes them (quoted when
        /// they hold `,` or `"`), read back unchanged.
        #[test]
        fn csv_reads_what_go_writes(written in proptest::collection::vec("[a-z=,\" ]{0,8}", 1..6)) {
            let record: Vec<String> = written
                .iter()
                .map(|f| if f.contains([',', '"']) || f.starts_with(' ') { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.clone() })
                .collect();
            proptest::prop_assert_eq!(fields(&record.join(",")).unwrap(), written);
        }
    }
}
