//! Adding keygate's headers to an answer (the request id, the rate-limit headers): written
//! into the header map directly, not through [`ResponseHeader::insert_header`].
//!
//! That method keeps each name's case in a second map, and for a name outside the standard
//! set it parses the name and copies it twice (once for each map), and the value once more:
//! three allocations per header, and both maps growing one step at a time. With the eight
//! rate-limit headers that was about a tenth of a limited call's CPU end to end. Here the
//! names are static, every value is written into one buffer, and the map grows at most once.
//!
//! The price: the answer loses the upstream's spelling of its header names (the case map is
//! dropped), on every answer, since every answer gets a request id. HTTP field names are
//! case-insensitive (RFC 9110 §5.1). Pingora then writes the twelve names it knows in title
//! case (`Content-Type`, `Content-Length`, `Set-Cookie`, `Date`, ...) and the rest in lower
//! case (`etag`, `x-request-id`), as HTTP/2 sends every name.

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::{ErrorType, OrErr, Result};

/// The values' buffer, taken on the first value written: the request id and the eight
/// rate-limit values fit (about 200 bytes); a longer one takes another buffer.
const VALUES_ROOM: usize = 256;

/// Where keygate's headers for one answer go: the answer's header map, and one buffer that
/// holds every value written.
pub(super) struct Added<'a> {
    map: &'a mut HeaderMap,
    values: BytesMut,
}

impl Added<'_> {
    /// Set `name` to `value`, copied into the values' buffer (an upstream's value for the
    /// name is replaced).
    pub(super) fn put(&mut self, name: &HeaderName, value: &[u8]) -> Result<()> {
        if self.values.capacity() == 0 {
            self.values.reserve(VALUES_ROOM);
        }
        self.values.extend_from_slice(value);
        // The value's bytes are split off: the values share the buffer's one allocation.
        let bytes = self.values.split().freeze();
        let value = HeaderValue::from_maybe_shared(bytes)
            .or_err(ErrorType::InvalidHTTPHeader, "invalid header value")?;
        self.map.insert(name.clone(), value);
        Ok(())
    }

    /// Set `name` to a value made already.
    pub(super) fn put_value(&mut self, name: &HeaderName, value: HeaderValue) {
        self.map.insert(name.clone(), value);
    }

    /// Set `name` to a fixed value.
    pub(super) fn put_static(&mut self, name: &HeaderName, value: &'static str) {
        self.map
            .insert(name.clone(), HeaderValue::from_static(value));
    }
}

/// Add headers to `resp` with `add` (see the module's text); `count` is how many it may add,
/// the room made in the map first (a wrong count costs only a regrowth). A reason phrase of
/// the upstream's own is kept. On an error the headers added before it stay.
pub(super) fn add_to(
    resp: &mut ResponseHeader,
    count: usize,
    add: impl FnOnce(&mut Added<'_>) -> Result<()>,
) -> Result<()> {
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(resp, empty));
    // Only room ahead of time: a map that cannot grow fails on the insert, as it would have.
    let _ = parts.headers.try_reserve(count);
    let added = add(&mut Added {
        map: &mut parts.headers,
        values: BytesMut::new(),
    });
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        resp.set_reason_phrase(reason.as_deref())?;
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::IntoCaseHeaderName;

    /// An answer as Pingora's HTTP/1 client reads it: names with their case kept.
    fn from_upstream(reason: &str) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, Some(3)).unwrap();
        resp.set_reason_phrase(Some(reason)).unwrap();
        for (name, value) in [
            ("Content-Type", "application/json"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Upstream-Note", "kept"),
        ] {
            resp.append_header(name.into_case_header_name(), value)
                .unwrap();
        }
        resp
    }

    fn wire(resp: &ResponseHeader) -> String {
        let mut buf = Vec::new();
        resp.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn added_headers_join_the_upstreams_and_the_reason_stays() {
        let mut resp = from_upstream("Fine Thanks");
        let note = HeaderName::from_static("x-upstream-note");
        let id = HeaderName::from_static("x-request-id");
        let limit = HeaderName::from_static("x-ratelimit-limit-requests");
        let long = "x".repeat(2 * VALUES_ROOM);
        add_to(&mut resp, 4, |h| {
            h.put_value(&id, HeaderValue::from_static("kg-1"));
            h.put(&limit, b"60")?;
            h.put(&note, b"replaced 2")?;
            h.put(&http::header::ETAG, long.as_bytes())?;
            h.put(&http::header::RETRY_AFTER, b"7")?;
            h.put_static(&http::header::CONNECTION, "close");
            Ok(())
        })
        .unwrap();
        assert_eq!(resp.get_reason_phrase(), Some("Fine Thanks"));
        assert_eq!(resp.status, 200);
        let wire = wire(&resp);
        for line in [
            "Content-Type: application/json\r\n",
            "Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n",
            "x-upstream-note: replaced 2\r\n",
            "x-request-id: kg-1\r\n",
            "x-ratelimit-limit-requests: 60\r\n",
            &format!("etag: {long}\r\n"),
            "retry-after: 7\r\n",
            "Connection: close\r\n",
        ] {
            assert!(wire.contains(line), "{line:?} in {wire}");
        }
        // Set-Cookie's two values, and one of each other name.
        assert_eq!(resp.headers.len(), 9, "{wire}");
    }

    #[test]
    fn a_bad_value_is_an_error_and_what_came_before_it_stays() {
        let mut resp = from_upstream("Fine Thanks");
        let good = HeaderName::from_static("x-good");
        let bad = HeaderName::from_static("x-bad");
        let err = add_to(&mut resp, 2, |h| {
            h.put(&good, b"yes")?;
            h.put(&bad, b"a\r\nb")
        });
        assert!(err.is_err());
        assert_eq!(resp.get_reason_phrase(), Some("Fine Thanks"));
        assert_eq!(resp.headers["x-good"], "yes");
        assert!(resp.headers.get("x-bad").is_none());
        assert_eq!(resp.headers["x-upstream-note"], "kept");
    }
}
