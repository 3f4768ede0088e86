//! The binary encodings of guest-abi.md: little-endian `u32`s, *bytes* = `u32` length
//! followed by that many bytes.

use crate::{Request, Response};

/// Why an encoded request or response does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A length points past the end of the input.
    Truncated,
    /// Bytes left over after the last field.
    TrailingBytes,
    /// Method, path or a header name is not UTF-8.
    NotUtf8,
    /// A response status outside `100..=599`.
    BadStatus,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }

    /// Header values may carry any bytes; non-UTF-8 ones are replaced, not refused.
    fn lossy_string(&mut self) -> Result<String, DecodeError> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>, DecodeError> {
        let count = self.u32()?;
        let mut headers = Vec::new();
        for _ in 0..count {
            headers.push((self.string()?, self.lossy_string()?));
        }
        Ok(headers)
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.buf.is_empty() {
            true => Ok(()),
            false => Err(DecodeError::TrailingBytes),
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, String)]) {
    put_u32(out, headers.len() as u32);
    for (name, value) in headers {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

fn headers_len(headers: &[(String, String)]) -> usize {
    headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum()
}

impl Request {
    /// Decodes a request (host to guest); the whole input must be used.
    pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader { buf };
        let request = Request {
            method: r.string()?,
            path: r.string()?,
            headers: r.headers()?,
            body: r.bytes()?.to_vec(),
        };
        r.finish()?;
        Ok(request)
    }

    /// Encodes a request as the host does (for tests and tools).
    pub fn encode(&self) -> Vec<u8> {
        let len = 16 + self.method.len() + self.path.len() + headers_len(&self.headers);
        let mut out = Vec::with_capacity(len + self.body.len());
        put_bytes(&mut out, self.method.as_bytes());
        put_bytes(&mut out, self.path.as_bytes());
        put_headers(&mut out, &self.headers);
        put_bytes(&mut out, &self.body);
        out
    }
}

impl Response {
    /// Encodes a response (guest to host).
    pub fn encode(&self) -> Vec<u8> {
        let len = 12 + headers_len(&self.headers) + self.body.len();
        let mut out = Vec::with_capacity(len);
        put_u32(&mut out, self.status);
        put_headers(&mut out, &self.headers);
        put_bytes(&mut out, &self.body);
        out
    }

    /// Decodes a response as the host does: status in range, no trailing bytes.
    pub fn decode(buf: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader { buf };
        let status = r.u32()?;
        if !(100..=599).contains(&status) {
            return Err(DecodeError::BadStatus);
        }
        let response = Response {
            status,
            headers: r.headers()?,
            body: r.bytes()?.to_vec(),
        };
        r.finish()?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Request {
        Request {
            method: "PUT".into(),
            path: "/kv/a?x=1&flag".into(),
            headers: vec![
                ("content-type".into(), "text/plain".into()),
                ("idempotency-key".into(), "k1".into()),
            ],
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn request_exact_bytes() {
        let req = Request::new("GET", "/v", b"x".to_vec());
        let expected: Vec<u8> = [
            &[3, 0, 0, 0][..],
            b"GET",
            &[2, 0, 0, 0],
            b"/v",
            &[0, 0, 0, 0],
            &[1, 0, 0, 0],
            b"x",
        ]
        .concat();
        assert_eq!(req.encode(), expected);
        assert_eq!(Request::decode(&expected).unwrap(), req);
    }

    #[test]
    fn response_exact_bytes() {
        let resp = Response::json(201, "{}");
        let expected: Vec<u8> = [
            &[201, 0, 0, 0][..],
            &[1, 0, 0, 0],
            &[12, 0, 0, 0],
            b"content-type",
            &[16, 0, 0, 0],
            b"application/json",
            &[2, 0, 0, 0],
            b"{}",
        ]
        .concat();
        assert_eq!(resp.encode(), expected);
        assert_eq!(Response::decode(&expected).unwrap(), resp);
    }

    #[test]
    fn request_round_trip_and_helpers() {
        let req = sample();
        let back = Request::decode(&req.encode()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.route(), "/kv/a");
        assert_eq!(back.query("x"), Some("1"));
        assert_eq!(back.query("flag"), Some(""));
        assert_eq!(back.query("y"), None);
        assert_eq!(back.header("Idempotency-Key"), Some("k1"));
        assert_eq!(Request::new("GET", "/value", vec![]).route(), "/value");
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert_eq!(
                Request::decode(&bytes[..n]),
                Err(DecodeError::Truncated),
                "{n}"
            );
        }
        let bytes = Response::json(200, "{\"a\":1}").encode();
        for n in 0..bytes.len() {
            assert_eq!(
                Response::decode(&bytes[..n]),
                Err(DecodeError::Truncated),
                "{n}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(Request::decode(&bytes), Err(DecodeError::TrailingBytes));
        let mut bytes = Response::json(200, "{}").encode();
        bytes.push(0);
        assert_eq!(Response::decode(&bytes), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = Vec::new();
        put_bytes(&mut bytes, b"GET");
        put_bytes(&mut bytes, b"/");
        put_u32(&mut bytes, u32::MAX);
        assert_eq!(Request::decode(&bytes), Err(DecodeError::Truncated));
        let mut bytes = Vec::new();
        put_bytes(&mut bytes, b"GET");
        put_u32(&mut bytes, u32::MAX);
        assert_eq!(Request::decode(&bytes), Err(DecodeError::Truncated));
    }

    #[test]
    fn utf8_rules() {
        let mut bytes = Vec::new();
        put_bytes(&mut bytes, b"GET");
        put_bytes(&mut bytes, b"/\xff");
        put_u32(&mut bytes, 0);
        put_bytes(&mut bytes, b"");
        assert_eq!(Request::decode(&bytes), Err(DecodeError::NotUtf8));

        let mut bytes = Vec::new();
        put_bytes(&mut bytes, b"GET");
        put_bytes(&mut bytes, b"/");
        put_u32(&mut bytes, 1);
        put_bytes(&mut bytes, b"x-raw");
        put_bytes(&mut bytes, b"a\xffb");
        put_bytes(&mut bytes, b"\xff\x00");
        let req = Request::decode(&bytes).unwrap();
        assert_eq!(req.header("x-raw"), Some("a\u{fffd}b"));
        assert_eq!(req.body, b"\xff\x00");
    }

    #[test]
    fn response_status_range() {
        for (status, ok) in [(99, false), (100, true), (599, true), (600, false)] {
            let bytes = Response::json(status, "{}").encode();
            assert_eq!(Response::decode(&bytes).is_ok(), ok, "{status}");
        }
    }

    #[test]
    fn response_helpers() {
        let r = Response::method_not_allowed("GET, PUT");
        assert_eq!(r.status, 405);
        assert_eq!(r.text(), r#"{"error":"method not allowed"}"#);
        assert!(r.headers.contains(&("allow".into(), "GET, PUT".into())));
        assert_eq!(Response::no_route().text(), r#"{"error":"no route"}"#);
        let b = Response::bytes(200, b"\x00\x01".to_vec());
        assert_eq!(b.headers[0].1, "application/octet-stream");
    }
}
