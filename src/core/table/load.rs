//! Building a [`KeyTable`] from a sync file while it is read: read in pieces, each key validated
//! and compiled as it comes and then dropped, so a load's memory peaks near the size of the
//! table it builds, never the file's and its parsed form's on top (at 1M keys those took 4.4
//! times the table). The checks and their messages are those of checking the whole parsed file,
//! whatever order the file's members come in: a parse error anywhere first, then
//! `quota_per_unit`, the groups, the model prices, the accounts, the groups' limits, then the
//! first bad key. Pure: the bytes come from a reader the caller opens
//! (`crate::support::sync_file` opens the file).

use super::compile::Compiler;
use super::{Digest, KeyTable, TableError};
use crate::core::config::{AccountEntry, GroupEntry, KeyEntryRef, ModelPrice, SyncFile};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

impl KeyTable {
    /// Read, validate and compile a sync file from the reader `open` gives. The file is
    /// streamed: each key is compiled as it is read, so neither the file's bytes nor its parsed
    /// form are ever held whole (at 1M keys they took several times the table's memory).
    /// `keys_hint` (about how many keys; 0 if unknown, see [`SyncFileSummary`]) sizes the
    /// table once. The table's `source_digest` is that of the bytes it was compiled from.
    ///
    /// `open` is called again (the file is read again) in two cases: when the fast reader is not
    /// sure of something (any parse error, an unusual spelling), serde alone parses the bytes
    /// held in memory, for its verdict and its message with the line and column it always had,
    /// and a file it accepts is then compiled with serde's streaming parser; and when `groups`
    /// or `accounts` come after `keys`, the keys are compiled on a second read. A file that
    /// changed between two reads is refused (the next check reads it again).
    pub fn from_reader<R: Read>(
        mut open: impl FnMut() -> std::io::Result<R>,
        source_name: &str,
        keys_hint: usize,
    ) -> Result<KeyTable, TableError> {
        let io = |e: std::io::Error| TableError::new(source_name, e.to_string());
        let mut c = Compiler::new(keys_hint);
        let mut src = HashingReader::new(open().map_err(io)?);
        let fast = compile_pieces(&mut src, &mut c).map_err(io)?;
        if !fast {
            drop((src, c));
            // Whatever the first try allocated is of no more use.
            crate::support::memory::release_free_memory();
            // Serde decides, from the file's bytes in memory as the loader always read them (so
            // a message has the line and column it always had), without compiling: the bytes
            // take less memory than the table.
            let mut bytes = Vec::new();
            open().map_err(io)?.read_to_end(&mut bytes).map_err(io)?;
            parse_only(&bytes).map_err(|e| TableError::new(source_name, e.to_string()))?;
            drop(bytes);
            // Well-formed: compile it, streaming.
            c = Compiler::new(keys_hint);
            src = HashingReader::new(open().map_err(io)?);
            compile_reader(&mut src, &mut c)
                .map_err(|e| TableError::new(source_name, e.to_string()))?;
        }
        let digest = src.finish();
        if c.stale() {
            c.restart_keys();
            let mut again = HashingReader::new(open().map_err(io)?);
            let read = if fast {
                compile_pieces(&mut again, &mut c).map_err(io)?
            } else {
                compile_reader(&mut again, &mut c).is_ok()
            };
            if !read || again.finish() != digest {
                return Err(TableError::new(
                    source_name,
                    "the file changed while it was read".into(),
                ));
            }
        }
        let table = c.finish().map(|mut t| {
            t.source_digest = digest;
            t
        });
        // Whatever the load allocated for a while (the keys as read, the id set, a rejected
        // table) is free now.
        crate::support::memory::release_free_memory();
        table.map_err(|m| TableError::new(source_name, m))
    }

    /// Validate and compile sync-file JSON; `source_name` is used in error messages.
    pub fn from_json(bytes: &[u8], source_name: &str) -> Result<KeyTable, TableError> {
        let hint = keys_hint(count_id_members(bytes), bytes.len());
        let mut c = Compiler::new(hint);
        let err = |e: serde_json::Error| TableError::new(source_name, e.to_string());
        compile_stream(serde_json::Deserializer::from_slice(bytes), &mut c).map_err(err)?;
        if c.stale() {
            c.restart_keys();
            compile_stream(serde_json::Deserializer::from_slice(bytes), &mut c).map_err(err)?;
        }
        let mut table = c.finish().map_err(|m| TableError::new(source_name, m))?;
        table.source_digest = Sha256::digest(bytes).into();
        Ok(table)
    }

    /// Validate and compile a parsed sync file.
    pub fn compile(file: &SyncFile, source_name: &str) -> Result<KeyTable, TableError> {
        let mut c = Compiler::new(file.keys.len());
        c.revision = file.revision;
        c.quota_per_unit = file.quota_per_unit;
        c.set_groups(file.groups.clone());
        c.set_models(&file.models);
        c.set_accounts(&file.accounts);
        for k in &file.keys {
            c.add_key(k);
        }
        c.finish().map_err(|m| TableError::new(source_name, m))
    }
}

impl TableError {
    fn new(source_name: &str, message: String) -> TableError {
        TableError {
            source_name: source_name.to_string(),
            message,
        }
    }
}

/// Bytes read from a sync file at a time.
const READ_BUFFER: usize = 256 * 1024;

/// What one read of a sync file tells before it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncFileSummary {
    /// SHA-256 of the content.
    pub digest: Digest,
    /// About how many keys it holds (a capacity hint: the table is then sized once, not grown
    /// by doubling while the file is read).
    pub keys_hint: usize,
}

impl SyncFileSummary {
    /// Read a sync file once, in pieces: hash it and estimate its key count.
    pub fn of_reader<R: Read>(mut src: R) -> std::io::Result<SyncFileSummary> {
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; READ_BUFFER];
        let (mut ids, mut len) = (0usize, 0usize);
        // The last bytes of the previous piece, for a `"id"` cut in two.
        let mut tail: Vec<u8> = Vec::with_capacity(6);
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let piece = &buf[..n];
            sha.update(piece);
            len += n;
            ids += count_id_members(piece);
            tail.extend_from_slice(&piece[..n.min(3)]);
            ids += count_id_members(&tail);
            tail.clear();
            tail.extend_from_slice(&piece[n.saturating_sub(3)..]);
        }
        Ok(SyncFileSummary {
            digest: sha.finalize().into(),
            keys_hint: keys_hint(ids, len),
        })
    }
}

/// How often `"id"` occurs: every key has an `id` member, written so by every JSON writer (an
/// escaped name or a string ending in `\"id` would make the count a little off, which costs
/// only memory).
fn count_id_members(bytes: &[u8]) -> usize {
    memchr::memmem::find_iter(bytes, b"\"id\"").count()
}

/// A key-count hint from a count of `"id"`, bounded by what a file of `len` bytes can hold.
fn keys_hint(ids: usize, len: usize) -> usize {
    /// The shortest key entry: `{"id":1,"key":"a"}`.
    const SHORTEST_KEY: usize = 18;
    ids.min(len / SHORTEST_KEY)
}

/// Passes what is read through SHA-256.
struct HashingReader<R> {
    inner: R,
    sha: Sha256,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            sha: Sha256::new(),
        }
    }

    /// The digest of what was read.
    fn finish(self) -> Digest {
        self.sha.finalize().into()
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// Parse sync-file JSON from `de` and compile it as it is read. A parse error anywhere in the
/// file wins over a validation error (the compiler reports its own at [`Compiler::finish`]).
fn compile_stream<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
    c: &mut Compiler,
) -> Result<(), serde_json::Error> {
    de::Deserializer::deserialize_struct(&mut de, "SyncFile", SYNC_FILE_FIELDS, FileVisitor(c))?;
    de.end()
}

/// [`compile_stream`] with serde's streaming parser over a reader.
fn compile_reader<R: Read>(src: R, c: &mut Compiler) -> Result<(), serde_json::Error> {
    let reader = std::io::BufReader::with_capacity(READ_BUFFER, src);
    compile_stream(serde_json::Deserializer::from_reader(reader), c)
}

/// Compile sync-file JSON read from `src` in pieces: each value is handed to serde whole, with
/// the same types as [`FileVisitor`] (so a key entry is parsed as fast as from memory, and only
/// one piece of the file is held at a time); the JSON between values is checked here,
/// strictly. `false` when this reader is not sure: any syntax, type or unknown-member error, a
/// repeated member, an escaped member name. The caller then lets serde read the file, for
/// serde's verdict and message. A key that fails validation is reported only once the whole
/// file has parsed ([`Compiler::finish`]), since a parse error wins.
fn compile_pieces<R: Read>(src: R, c: &mut Compiler) -> std::io::Result<bool> {
    let mut p = Pieces {
        src,
        buf: vec![0; READ_BUFFER],
        pos: 0,
        end: 0,
        eof: false,
    };
    p.members(c)
}

/// A sync file read in pieces (see [`compile_pieces`]).
struct Pieces<R> {
    src: R,
    /// Read but not yet consumed: `buf[pos..end]`.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
}

impl<R: std::io::Read> Pieces<R> {
    /// Read more: at least one byte, or `eof`.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.buf.len() - self.end < READ_BUFFER / 4 {
            // One value is larger than the buffer: grow it.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.end += n;
        self.eof = n == 0;
        Ok(())
    }

    /// The next byte after JSON whitespace, not consumed; `None` at the end of the file.
    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            while let Some(&b) = self.buf[..self.end].get(self.pos) {
                if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                    return Ok(Some(b));
                }
                self.pos += 1;
            }
            if self.eof {
                return Ok(None);
            }
            self.fill()?;
        }
    }

    /// Consume `b` if it is the next byte after whitespace.
    fn eat(&mut self, b: u8) -> std::io::Result<bool> {
        let hit = self.peek()? == Some(b);
        self.pos += usize::from(hit);
        Ok(hit)
    }

    /// The next value's bytes, consumed; `None` when it does not end before the file does.
    /// Whether they are one valid value is serde's call.
    fn value(&mut self) -> std::io::Result<Option<std::ops::Range<usize>>> {
        if self.peek()?.is_none() {
            return Ok(None);
        }
        loop {
            // A value must be followed by a byte (a number could go on in the next piece).
            match value_end(&self.buf[self.pos..self.end]) {
                Some(n) if self.pos + n < self.end => {
                    let r = self.pos..self.pos + n;
                    self.pos += n;
                    return Ok(Some(r));
                }
                _ if self.eof => return Ok(None),
                _ => self.fill()?,
            }
        }
    }

    /// The next value parsed as `T`; `None` when it is not one.
    fn parse<T: de::DeserializeOwned>(&mut self) -> std::io::Result<Option<T>> {
        Ok(self
            .value()?
            .and_then(|r| serde_json::from_slice(&self.buf[r]).ok()))
    }

    /// The top-level object, member by member; `false` when not sure (see [`compile_pieces`]).
    fn members(&mut self, c: &mut Compiler) -> std::io::Result<bool> {
        if !self.eat(b'{')? {
            return Ok(false);
        }
        let mut seen = [false; SYNC_FILE_FIELDS.len()];
        if !self.eat(b'}')? {
            loop {
                // A member name as written, without escapes: serde's parser judges any other.
                let Some(name) = self.value()? else {
                    return Ok(false);
                };
                let name = self.buf[name]
                    .strip_prefix(b"\"")
                    .and_then(|n| n.strip_suffix(b"\""));
                let Some(i) = SYNC_FILE_FIELDS
                    .iter()
                    .position(|f| name == Some(f.as_bytes()))
                else {
                    return Ok(false);
                };
                if std::mem::replace(&mut seen[i], true) || !self.eat(b':')? {
                    return Ok(false);
                }
                let known = match SYNC_FILE_FIELDS[i] {
                    "revision" => self.parse().map(|v| v.map(|v| c.revision = v))?,
                    "quota_per_unit" => self.parse().map(|v| v.map(|v| c.quota_per_unit = v))?,
                    "next_id" => self.parse::<Option<u64>>()?.map(drop),
                    "groups" => self.parse().map(|g| g.map(|g| c.set_groups(g)))?,
                    "models" => self.parse().map(|m| m.map(|m| c.set_models(&m)))?,
                    "accounts" => self.parse().map(|a| a.map(|a| c.set_accounts(&a)))?,
                    _ => self.keys(c)?.then_some(()),
                };
                if known.is_none() {
                    return Ok(false);
                }
                if self.eat(b'}')? {
                    break;
                }
                if !self.eat(b',')? {
                    return Ok(false);
                }
            }
        }
        // Nothing but whitespace after the object.
        Ok(self.peek()?.is_none())
    }

    /// The `keys` array, one entry at a time.
    fn keys(&mut self, c: &mut Compiler) -> std::io::Result<bool> {
        if !self.eat(b'[')? {
            return Ok(false);
        }
        if self.eat(b']')? {
            return Ok(true);
        }
        loop {
            // Parsed where it lies in the piece, its strings borrowed from it; when the piece
            // ends inside it, read more and parse it again.
            if self.peek()?.is_none() {
                return Ok(false);
            }
            let parsed = {
                let piece = &self.buf[self.pos..self.end];
                let mut one =
                    serde_json::Deserializer::from_slice(piece).into_iter::<KeyEntryRef>();
                match one.next() {
                    Some(Ok(k)) => {
                        c.add_key(&k);
                        Some(one.byte_offset())
                    }
                    Some(Err(e)) if e.is_eof() && !self.eof => None,
                    _ => return Ok(false),
                }
            };
            match parsed {
                Some(n) => self.pos += n,
                None => {
                    self.fill()?;
                    continue;
                }
            }
            if self.eat(b']')? {
                return Ok(true);
            }
            if !self.eat(b',')? {
                return Ok(false);
            }
        }
    }
}

/// Where the JSON value at the start of `b` ends: a string to its closing quote, an array or
/// object to its matching bracket (strings inside skipped), anything else to the next
/// delimiter. `None` when `b` ends first. Not a validation: the bytes found go to serde.
fn value_end(b: &[u8]) -> Option<usize> {
    fn string_end(b: &[u8], from: usize) -> Option<usize> {
        let mut i = from + 1;
        loop {
            i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
            if b[i] == b'"' {
                return Some(i + 1);
            }
            i += 2;
        }
    }
    match *b.first()? {
        b'"' => string_end(b, 0),
        b'[' | b'{' => {
            let mut depth = 0usize;
            let mut i = 0;
            loop {
                match *b.get(i)? {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'[' | b'{' => depth += 1,
                    b']' | b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => b
            .iter()
            .position(|b| matches!(b, b',' | b'}' | b']' | b':' | b' ' | b'\t' | b'\r' | b'\n'))
            .filter(|&n| n > 0),
    }
}

/// Parse sync-file JSON without compiling it: serde's verdict on its syntax and types.
fn parse_only(bytes: &[u8]) -> Result<(), serde_json::Error> {
    let mut c = Compiler::new(0);
    c.parse_only = true;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de::Deserializer::deserialize_struct(
        &mut de,
        "SyncFile",
        SYNC_FILE_FIELDS,
        FileVisitor(&mut c),
    )?;
    de.end()
}

/// The members of a sync file, as [`SyncFile`] declares them.
const SYNC_FILE_FIELDS: &[&str] = &[
    "revision",
    "quota_per_unit",
    "next_id",
    "groups",
    "models",
    "keys",
    "accounts",
];

/// Reads a sync file's top-level object member by member, as serde reads [`SyncFile`] (the same
/// types and messages; unknown and repeated members are errors), handing each to the compiler;
/// the `keys` array is compiled one key at a time.
struct FileVisitor<'c>(&'c mut Compiler);

impl<'de> Visitor<'de> for FileVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("struct SyncFile")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let c = self.0;
        let mut seen = [false; SYNC_FILE_FIELDS.len()];
        while let Some(FileField(i)) = map.next_key()? {
            if std::mem::replace(&mut seen[i], true) {
                return Err(de::Error::duplicate_field(SYNC_FILE_FIELDS[i]));
            }
            match SYNC_FILE_FIELDS[i] {
                "revision" => c.revision = map.next_value()?,
                "quota_per_unit" => c.quota_per_unit = map.next_value()?,
                "next_id" => {
                    map.next_value::<Option<u64>>()?;
                }
                "groups" => c.set_groups(map.next_value::<BTreeMap<String, GroupEntry>>()?),
                "models" => c.set_models(&map.next_value::<BTreeMap<String, ModelPrice>>()?),
                "accounts" => {
                    c.set_accounts(&map.next_value::<BTreeMap<String, AccountEntry>>()?);
                }
                _ => map.next_value_seed(Keys(&mut *c))?,
            }
        }
        Ok(())
    }

    /// The positional form serde accepts for any struct: an array of the members in
    /// [`SYNC_FILE_FIELDS`] order, the missing ones at their defaults.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let c = self.0;
        let done = |found: Option<()>| found.is_none();
        if done(seq.next_element()?.map(|v| c.revision = v))
            || done(seq.next_element()?.map(|v| c.quota_per_unit = v))
            || done(seq.next_element::<Option<u64>>()?.map(drop))
            || done(seq.next_element()?.map(|g| c.set_groups(g)))
            || done(seq.next_element()?.map(|m| c.set_models(&m)))
            || done(seq.next_element_seed(Keys(&mut *c))?)
        {
            return Ok(());
        }
        if let Some(a) = seq.next_element::<BTreeMap<String, AccountEntry>>()? {
            c.set_accounts(&a);
        }
        Ok(())
    }
}

/// A sync-file member name: its index in [`SYNC_FILE_FIELDS`].
struct FileField(usize);

impl<'de> Deserialize<'de> for FileField {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FileField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("field identifier")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileField, E> {
                SYNC_FILE_FIELDS
                    .iter()
                    .position(|f| *f == v)
                    .map(FileField)
                    .ok_or_else(|| E::unknown_field(v, SYNC_FILE_FIELDS))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// The `keys` array, compiled one entry at a time (each entry is dropped once compiled).
struct Keys<'c>(&'c mut Compiler);

impl<'de> DeserializeSeed<'de> for Keys<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Keys<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(k) = seq.next_element::<KeyEntryRef>()? {
            self.0.add_key(&k);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
