//! A `.env` reader for `mcpfly seal --from-env-file`.
//!
//! Accepted: `KEY=value` lines; blank lines and `#` comment lines; an `export ` prefix; CRLF line ends;
//! unquoted values (trimmed, `=` kept, a ` #` starts a comment); `'single'` quotes (literal) and `"double"`
//! quotes (`\n \r \t \" \\` escapes), both may span lines; empty values. A repeated key is an error rather
//! than "last wins", because sealing the wrong one of two values is a silent mistake. Errors name the line
//! and the reason, never a value.

use zeroize::Zeroizing;

use super::envelope::validate_credential_name;
use super::secret_value::SecretValue;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(".env line {line}: {reason}")]
pub struct DotenvError {
    pub line: usize,
    pub reason: String,
}

/// Parses `.env` text into (name, value) pairs in file order.
pub fn parse(text: &str) -> Result<Vec<(String, SecretValue)>, DotenvError> {
    let mut out: Vec<(String, SecretValue)> = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let chars = Zeroizing::new(chars);
    let mut i = 0;
    let mut line = 1;
    let err = |line, reason: &str| DotenvError {
        line,
        reason: reason.to_owned(),
    };
    while i < chars.len() {
        let start_line = line;
        // Leading whitespace.
        while i < chars.len() && matches!(chars[i], ' ' | '\t' | '\r') {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        if chars[i] == '\n' {
            i += 1;
            line += 1;
            continue;
        }
        if chars[i] == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        // Key (with an optional `export ` prefix).
        let key_start = i;
        while i < chars.len() && !matches!(chars[i], '=' | '\n') {
            i += 1;
        }
        if i >= chars.len() || chars[i] != '=' {
            return Err(err(start_line, "expected KEY=VALUE"));
        }
        let mut key: String = chars[key_start..i]
            .iter()
            .collect::<String>()
            .trim()
            .to_owned();
        if let Some(rest) = key.strip_prefix("export")
            && rest.starts_with([' ', '\t'])
        {
            key = rest.trim().to_owned();
        }
        validate_credential_name(&key).map_err(|_| {
            err(
                start_line,
                &format!("{key:?} is not a valid name (must match ^[A-Za-z_][A-Za-z0-9_]*$)"),
            )
        })?;
        i += 1; // '='
        while i < chars.len() && matches!(chars[i], ' ' | '\t') {
            i += 1;
        }
        let mut value = Zeroizing::new(String::new());
        match chars.get(i) {
            Some(&q @ ('"' | '\'')) => {
                i += 1;
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err(err(start_line, "unterminated quoted value"));
                    };
                    i += 1;
                    match c {
                        c if c == q => break,
                        '\\' if q == '"' => {
                            let Some(&e) = chars.get(i) else {
                                return Err(err(start_line, "unterminated quoted value"));
                            };
                            i += 1;
                            let ch = match e {
                                'n' => '\n',
                                'r' => '\r',
                                't' => '\t',
                                '"' => '"',
                                '\\' => '\\',
                                '\n' => {
                                    line += 1;
                                    '\n'
                                }
                                other => {
                                    value.push('\\');
                                    other
                                }
                            };
                            value.push(ch);
                        }
                        '\r' if chars.get(i) == Some(&'\n') => {} // CRLF inside quotes reads as LF
                        '\n' => {
                            line += 1;
                            value.push('\n');
                        }
                        c => value.push(c),
                    }
                }
                // After the closing quote: spaces, then an optional comment.
                while i < chars.len() && matches!(chars[i], ' ' | '\t' | '\r') {
                    i += 1;
                }
                if i < chars.len() && chars[i] == '#' {
                    while i < chars.len() && chars[i] != '\n' {
                        i += 1;
                    }
                }
                if i < chars.len() && chars[i] != '\n' {
                    return Err(err(line, "unexpected text after the closing quote"));
                }
            }
            _ => {
                while i < chars.len() && chars[i] != '\n' {
                    if chars[i] == '#' && value.ends_with([' ', '\t']) {
                        while i < chars.len() && chars[i] != '\n' {
                            i += 1;
                        }
                        break;
                    }
                    value.push(chars[i]);
                    i += 1;
                }
                let trimmed_len = value.trim_end().len();
                value.truncate(trimmed_len);
            }
        }
        if out.iter().any(|(k, _)| k == &key) {
            return Err(err(start_line, &format!("{key} is set twice")));
        }
        out.push((key, SecretValue::new(std::mem::take(&mut *value))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse(text)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.expose().to_owned()))
            .collect()
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn edge_cases() {
        let text = "# comment\r\n\
                    export A=1\r\n\
                    B = two words  \r\n\
                    C=a=b==c\n\
                    D=\n\
                    E=\"quoted # not comment\" # comment\n\
                    F='single \\n literal'\n\
                    G=\"esc\\n\\\"x\\\\\"\n\
                    H=val # trailing comment\n\
                    I=val#nocomment\n\
                    \n   # indented comment\n\
                    J=\"multi\r\nline\"\n\
                    export_K=not-a-prefix\n\
                    L=''\n";
        assert_eq!(
            pairs(text),
            vec![
                p("A", "1"),
                p("B", "two words"),
                p("C", "a=b==c"),
                p("D", ""),
                p("E", "quoted # not comment"),
                p("F", "single \\n literal"),
                p("G", "esc\n\"x\\"),
                p("H", "val"),
                p("I", "val#nocomment"),
                p("J", "multi\nline"),
                p("export_K", "not-a-prefix"),
                p("L", ""),
            ]
        );
    }

    #[test]
    fn no_trailing_newline_and_empty_file() {
        assert_eq!(pairs("A=1"), vec![p("A", "1")]);
        assert!(pairs("").is_empty());
        assert!(pairs("\r\n# x\n").is_empty());
    }

    #[test]
    fn errors_name_the_line_and_never_the_value() {
        let e = parse("A=1\nB=\"unterminated-canary\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(!e.to_string().contains("canary"));
        let e = parse("A=1\nnot a pair-canary\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(!e.to_string().contains("canary"));
        let e = parse("1BAD=x\n").unwrap_err();
        assert!(e.to_string().contains("1BAD"));
        let e = parse("A=secret-canary\nA=other\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("twice") && !e.to_string().contains("canary"));
        let e = parse("A=\"x\" trailing-canary\n").unwrap_err();
        assert!(!e.to_string().contains("canary"));
    }
}
