//! A strict JSON scanner: checks a whole body's grammar and nesting depth without decoding it.
//! Pure, no allocation.

use crate::core::errors::{Denial, Reason};

/// The deepest nesting of arrays and objects accepted in a JSON request body, the top-level
/// object counting as one.
pub const MAX_JSON_DEPTH: usize = 128;

// The skipper keeps one bit per open container in a `u128`.
const _: () = assert!(MAX_JSON_DEPTH <= 128);

/// A strict JSON scanner over a whole body: checks the grammar (RFC 8259) and the nesting depth
/// without decoding anything. As serde_json does when it skips a value, the bytes inside a
/// skipped string are not checked to be UTF-8 and `\u` escapes are not paired.
pub(crate) struct Scanner<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    pub(crate) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    pub(crate) fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.pos += usize::from(hit);
        hit
    }

    #[inline]
    pub(crate) fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    #[cold]
    pub(crate) fn error(&self, what: &str) -> Denial {
        self.error_at(self.pos, what)
    }

    #[cold]
    pub(crate) fn error_at(&self, at: usize, what: &str) -> Denial {
        let what = if at >= self.bytes.len() && !what.starts_with("the body") {
            format!("{what} (the body ends at byte {at})")
        } else {
            format!("{what} at byte {at}")
        };
        Denial::with_message(
            Reason::InvalidJson,
            format!("The request body is not valid JSON: {what}."),
        )
    }

    /// `"name"` and the `:` after it; the name as written (quotes included, escapes undecoded)
    /// and whether it has escapes.
    pub(crate) fn member_name(&mut self) -> Result<(&'a [u8], bool), Denial> {
        if self.peek() != Some(b'"') {
            return Err(self.error(if self.pos >= self.bytes.len() {
                "the body ends where a member name should be"
            } else {
                "expected a member name"
            }));
        }
        let start = self.pos;
        let escaped = self.skip_string()?;
        let quoted = &self.bytes[start..self.pos];
        self.skip_ws();
        if !self.eat(b':') {
            return Err(self.error("expected ':'"));
        }
        Ok((quoted, escaped))
    }

    /// Skip one value, checking it; `open` containers enclose it.
    pub(crate) fn skip_value(&mut self, open: usize) -> Result<(), Denial> {
        // Bit `n` set: the `n`th container opened here is an object (clear: an array).
        let mut objects: u128 = 0;
        let mut n: usize = 0;
        'value: loop {
            self.skip_ws();
            match self.peek() {
                Some(c @ (b'{' | b'[')) => {
                    if open + n >= MAX_JSON_DEPTH {
                        return Err(self.error(&format!(
                            "nesting deeper than {MAX_JSON_DEPTH} arrays and objects"
                        )));
                    }
                    self.pos += 1;
                    let object = c == b'{';
                    objects = (objects & !(1 << n)) | (u128::from(object) << n);
                    n += 1;
                    self.skip_ws();
                    if !self.eat(if object { b'}' } else { b']' }) {
                        if object {
                            self.member_name()?;
                        }
                        continue 'value;
                    }
                    n -= 1;
                }
                Some(b'"') => {
                    self.skip_string()?;
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.skip_number()?,
                Some(_) => return Err(self.error("expected a value")),
                None => return Err(self.error("the body ends where a value should be")),
            }
            // A value is complete: close containers until one continues.
            loop {
                if n == 0 {
                    return Ok(());
                }
                self.skip_ws();
                let object = objects >> (n - 1) & 1 == 1;
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if object {
                            self.skip_ws();
                            self.member_name()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => n -= 1,
                    Some(b']') if !object => n -= 1,
                    None => return Err(self.error("the body ends inside an array or object")),
                    Some(_) if object => return Err(self.error("expected ',' or '}'")),
                    Some(_) => return Err(self.error("expected ',' or ']'")),
                }
                self.pos += 1;
            }
        }
    }

    /// Skip the string that starts here (at its quote); whether it has escapes.
    #[inline]
    pub(crate) fn skip_string(&mut self) -> Result<bool, Denial> {
        let start = self.pos;
        self.pos += 1;
        let mut escaped = false;
        loop {
            self.pos += string_run(&self.bytes[self.pos..]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            let hex = self.bytes.get(self.pos + 1..self.pos + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(self.error("a bad \\u escape"));
                            }
                            self.pos += 5;
                        }
                        _ => return Err(self.error("a bad escape")),
                    }
                }
                Some(_) => return Err(self.error("a control character in a string")),
                None => return Err(self.error_at(start, "a string that does not end")),
            }
        }
    }

    pub(crate) fn literal(&mut self, word: &[u8]) -> Result<(), Denial> {
        if !self.bytes[self.pos..].starts_with(word) {
            return Err(self.error("expected a value"));
        }
        self.pos += word.len();
        Ok(())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    pub(crate) fn skip_number(&mut self) -> Result<(), Denial> {
        let digits = |s: &mut Self| {
            let from = s.pos;
            while s.peek().is_some_and(|b| b.is_ascii_digit()) {
                s.pos += 1;
            }
            s.pos > from
        };
        self.eat(b'-');
        if !self.eat(b'0') && !digits(self) {
            return Err(self.error("a bad number"));
        }
        if self.eat(b'.') && !digits(self) {
            return Err(self.error("a bad number"));
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if !digits(self) {
                return Err(self.error("a bad number"));
            }
        }
        Ok(())
    }
}

/// How many bytes from the start of `s` are plain string content: up to the first quote,
/// backslash or control character (or the end). Eight bytes at a time.
#[inline]
fn string_run(s: &[u8]) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        // The "has a zero byte" trick: the lowest flagged byte is always a true match.
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        let q = w ^ (ONES * u64::from(b'"'));
        let quote = q.wrapping_sub(ONES) & !q;
        let b = w ^ (ONES * u64::from(b'\\'));
        let backslash = b.wrapping_sub(ONES) & !b;
        let hits = (control | quote | backslash) & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while s
        .get(i)
        .is_some_and(|&b| b != b'"' && b != b'\\' && b >= 0x20)
    {
        i += 1;
    }
    i
}
