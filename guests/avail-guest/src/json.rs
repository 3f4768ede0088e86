//! Just enough JSON: a writer for flat objects, and a parser for flat objects whose
//! values are all integers (`{"from": 1, "to": 2, "amount": 30}`).

/// Appends `s` as a quoted, escaped JSON string.
pub fn push_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str("\\u00");
                out.push(HEX[(c as usize) >> 4] as char);
                out.push(HEX[(c as usize) & 15] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `n` in decimal.
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits[i..].iter().for_each(|&d| out.push(d as char));
}

/// Appends `n` in decimal.
pub fn push_i64(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    push_u64(out, n.unsigned_abs());
}

/// Builds one flat JSON object: `Object::new().u64("value", 3).finish()` is `{"value":3}`.
#[derive(Debug, Default)]
pub struct Object {
    buf: String,
}

impl Object {
    pub fn new() -> Self {
        Object { buf: String::new() }
    }

    /// Appends `"key":` and returns the buffer for the value.
    fn key(&mut self, key: &str) -> &mut String {
        self.buf.push(if self.buf.is_empty() { '{' } else { ',' });
        push_str(&mut self.buf, key);
        self.buf.push(':');
        &mut self.buf
    }

    pub fn u64(mut self, key: &str, v: u64) -> Self {
        push_u64(self.key(key), v);
        self
    }

    pub fn i64(mut self, key: &str, v: i64) -> Self {
        push_i64(self.key(key), v);
        self
    }

    pub fn bool(mut self, key: &str, v: bool) -> Self {
        self.key(key).push_str(if v { "true" } else { "false" });
        self
    }

    pub fn str(mut self, key: &str, v: &str) -> Self {
        push_str(self.key(key), v);
        self
    }

    /// An array of numbers.
    pub fn u64_array(mut self, key: &str, items: impl IntoIterator<Item = u64>) -> Self {
        let out = self.key(key);
        out.push('[');
        for (i, n) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_u64(out, n);
        }
        out.push(']');
        self
    }

    pub fn finish(mut self) -> String {
        if self.buf.is_empty() {
            self.buf.push('{');
        }
        self.buf.push('}');
        self.buf
    }
}

/// Parses a JSON object whose values are all integers fitting an `i64`, in any order,
/// with any JSON whitespace. Keys may repeat (the caller decides). Anything else
/// (other value types, fractions, exponents, leading zeros, trailing data, invalid
/// UTF-8) gives `None`.
pub fn parse_int_object(input: &[u8]) -> Option<Vec<(String, i64)>> {
    let mut p = Parser {
        s: std::str::from_utf8(input).ok()?.as_bytes(),
        pos: 0,
    };
    let mut fields = Vec::new();
    p.expect(b'{')?;
    if !p.eat(b'}') {
        loop {
            let key = p.string()?;
            p.expect(b':')?;
            fields.push((key, p.integer()?));
            if p.eat(b'}') {
                break;
            }
            p.expect(b',')?;
        }
    }
    p.ws();
    (p.pos == p.s.len()).then_some(fields)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// Skips whitespace, then consumes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let found = self.peek() == Some(c);
        self.pos += found as usize;
        found
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }

    fn string(&mut self) -> Option<String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.next()? {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let c = match self.next()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        // \u escapes: BMP only (no surrogate pairs), enough for keys.
                        b'u' => {
                            let hex = self.s.get(self.pos..self.pos + 4)?;
                            self.pos += 4;
                            let hex = std::str::from_utf8(hex).ok()?;
                            char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
                        }
                        _ => return None,
                    };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                c if c < 0x20 => return None,
                c => out.push(c),
            }
        }
    }

    fn integer(&mut self) -> Option<i64> {
        self.ws();
        let negative = self.peek() == Some(b'-');
        self.pos += negative as usize;
        let start = self.pos;
        let mut n: i64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            let d = i64::from(d - b'0');
            n = n.checked_mul(10)?;
            n = if negative {
                n.checked_sub(d)?
            } else {
                n.checked_add(d)?
            };
            self.pos += 1;
        }
        let digits = &self.s[start..self.pos];
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        let fraction = matches!(self.peek(), Some(b'.' | b'e' | b'E'));
        (!digits.is_empty() && !leading_zero && !fraction).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<Vec<(String, i64)>> {
        parse_int_object(s.as_bytes())
    }

    fn fields(pairs: &[(&str, i64)]) -> Option<Vec<(String, i64)>> {
        Some(pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect())
    }

    #[test]
    fn writes_objects() {
        let o = Object::new()
            .u64("a", 0)
            .i64("b", -12)
            .bool("c", true)
            .str("d", "q\"\\\n\u{1}é")
            .u64_array("e", [1, 20, u64::MAX])
            .finish();
        assert_eq!(
            o,
            r#"{"a":0,"b":-12,"c":true,"d":"q\"\\\n\u0001é","e":[1,20,18446744073709551615]}"#
        );
        assert_eq!(Object::new().finish(), "{}");
        assert_eq!(Object::new().u64_array("x", []).finish(), r#"{"x":[]}"#);
        let mut s = String::new();
        push_i64(&mut s, i64::MIN);
        assert_eq!(s, "-9223372036854775808");
    }

    #[test]
    fn parses_int_objects() {
        let t = fields(&[("from", 1), ("to", 2), ("amount", 30)]);
        assert_eq!(parse(r#"{"from":1,"to":2,"amount":30}"#), t);
        assert_eq!(
            parse(" \n{ \"from\" : 1 ,\t\"to\":2,\r\n\"amount\" :30 } \n"),
            t
        );
        let t = fields(&[("amount", 5), ("to", 0), ("from", 99)]);
        assert_eq!(parse(r#"{"amount":5,"to":0,"from":99}"#), t);
        assert_eq!(parse("{}"), fields(&[]));
        assert_eq!(parse(r#"{"a":-7,"a":0}"#), fields(&[("a", -7), ("a", 0)]));
        assert_eq!(parse(r#"{"\u0061\n":1}"#), fields(&[("a\n", 1)]));
        assert_eq!(
            parse(r#"{"max":9223372036854775807,"min":-9223372036854775808}"#),
            fields(&[("max", i64::MAX), ("min", i64::MIN)])
        );
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            " ",
            "[]",
            "1",
            "{",
            "}",
            "{,}",
            r#"{"a":1,}"#,
            r#"{"a":1 "b":2}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":"1"}"#,
            r#"{"a":1.0}"#,
            r#"{"a":1e3}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":+1}"#,
            r#"{"a":true}"#,
            r#"{"a":null}"#,
            r#"{"a":[1]}"#,
            r#"{"a":1}x"#,
            r#"{"a":1}{}"#,
            r#"{"a":9223372036854775808}"#,
            r#"{"a":-9223372036854775809}"#,
            r#"{"a\q":1}"#,
            r#"{"a\u00":1}"#,
            "{\"a\u{1}\":1}",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse_int_object(b"{\"\xff\":1}"), None);
    }
}
