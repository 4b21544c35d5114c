//! The streaming loader says what checking the whole parsed file says, however the file's
//! members are ordered and however it is cut into pieces.

use super::*;
use crate::core::table::verdict::{table_verdict, verdicts_every_way};
use crate::core::table::{digest_hex, key_digest};

fn table(json: &str) -> Result<KeyTable, TableError> {
    KeyTable::from_json(json.as_bytes(), "test.json")
}

/// Sync files whose members come in unusual orders or that have several problems: the
/// streaming loader must say what parsing the whole file and then compiling it says.
const ORDERS_AND_PROBLEMS: &[&str] = &[
    r#"{"keys":[{"id":1,"key":"a","group":"vip"},{"id":2,"key":"b"}],"groups":{"vip":{"ratio":0.5}}}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1},{"id":2,"key":"b","group":"gold"}],"groups":{}}"#,
    r#"{"keys":[{"id":1,"key":"a","group":"gold"},{"id":2,"key":"b","quota":-1}],"groups":{}}"#,
    r#"{"keys":[{"id":1,"key":"a","group":"gold","allow_ips":["x"]}],"groups":{}}"#,
    r#"{"keys":[{"id":1,"key":"a","group":"gold","quota":-1}],"groups":{}}"#,
    r#"{"keys":[{"id":1,"key":"a","group":"gold"}]}"#,
    r#"{"keys":[{"id":1,"key":"a","group":"vip","previous_keys":[{"key_sha256":"0000000000000000000000000000000000000000000000000000000000000000","until":5}]}],"groups":{"vip":{}}}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1},{"id":2,"kee":"b"}]}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1}],"groups":{"g":{"ratio":-1}}}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1}],"models":{"m":{}}}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1}],"quota_per_unit":0,"groups":{"g":{"ratio":-1}}}"#,
    r#"{"keys":[{"id":1,"key":"a"},{"id":1,"key":"b"},{"id":3,"key":"a"}]}"#,
    r#"{"keys":[],"keys":[]}"#,
    r#"{"keys":[],"kyes":[]}"#,
    r#"{"ke\u0079s":[{"id":1,"key":"a"}]}"#,
    r#"{"keys":[{"id":1,"key":"a"}]} x"#,
    r#"{"keys":[{"id":1,"key":"a"}"#,
    r#"[]"#,
    r#"[3, 1000, null, {"vip":{}}, {}, [{"id":1,"key":"a","group":"vip"}]]"#,
    r#"{"revision":7,"quota_per_unit":1000,"next_id":9,"groups":{"default":{"ratio":2,"models":["m*"]}},"models":{"m1":{"ratio":1},"*":{"price":0.5}},"keys":[{"id":8,"name":"n","key":"a","status":"disabled","quota":5,"unlimited_quota":true,"used":1,"expires_at":99,"models":["m1"],"allow_ips":["10.0.0.0/8","::1"]}]}"#,
    // Accounts (SPEC §7): after the keys (as `keygate keys` writes them), before, and wrong.
    r#"{"keys":[{"id":1,"key":"a","account":"acme"},{"id":2,"key":"b","account":"acme"}],"accounts":{"acme":{"max_keys":2,"limits":{"rpm":3}}}}"#,
    r#"{"accounts":{"acme":{"max_keys":1}},"keys":[{"id":1,"key":"a","account":"acme"},{"id":2,"key":"b","account":"acme"}]}"#,
    r#"{"keys":[{"id":1,"key":"a","account":"acme"},{"id":2,"key":"b","account":"acme"}],"accounts":{"acme":{"max_keys":1}}}"#,
    r#"{"keys":[{"id":1,"key":"a","account":"nope"}],"accounts":{"acme":{}}}"#,
    r#"{"keys":[{"id":1,"key":"a","account":"acme"}]}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1}],"accounts":{"acme":{"quota":-5}}}"#,
    r#"{"keys":[{"id":1,"key":"a"}],"accounts":{}}"#,
    r#"{"keys":[],"accounts":{"acme":{}},"accounts":{}}"#,
    // Limits and budgets: a key's own, its group's (groups after keys), and bad ones.
    r#"{"keys":[{"id":1,"key":"a","group":"vip"},{"id":2,"key":"b","limits":{"tpm":9}}],"groups":{"vip":{"limits":{"rpm":5}}}}"#,
    r#"{"keys":[{"id":1,"key":"a","limits":{"rpm":-1}}]}"#,
    r#"{"keys":[{"id":1,"key":"a","quota":-1}],"groups":{"vip":{"limits":{"rpm":-1}}}}"#,
    r#"{"keys":[{"id":1,"key":"a","budget":{"period":"daily","amount":10,"timezone":"Europe/Paris"}},{"id":2,"key":"b","budget":{"period":"hourly","amount":1}}]}"#,
    r#"{"keys":[{"id":4611686018427387904,"key":"a"}]}"#,
    r#"{"keys":[{"id":1,"key":"a","account":"acme","limits":{"rpm":-1}}],"accounts":{"acme":{"max_keys":0}}}"#,
    r#"[0, 1000, null, {}, {}, [{"id":1,"key":"a","account":"acme"}], {"acme":{"max_keys":0}}]"#,
];

#[test]
fn streaming_reports_what_checking_the_parsed_whole_file_reports() {
    for json in ORDERS_AND_PROBLEMS {
        // Streamed from memory, parsed whole then compiled, and read in small pieces.
        let [streamed, whole, read] = verdicts_every_way(json.as_bytes(), "test.json");
        assert_eq!(streamed, whole, "{json}");
        assert_eq!(streamed, read, "{json}");
    }
    let t = table(ORDERS_AND_PROBLEMS[0]).unwrap();
    assert_eq!(t.group_of(t.lookup(&key_digest(b"a")).unwrap()).ratio, 0.5);
    assert_eq!(
        &*t.group_of(t.lookup(&key_digest(b"b")).unwrap()).name,
        "default"
    );
    let message = |json: &str| table(json).unwrap_err().message;
    assert_eq!(
        message(ORDERS_AND_PROBLEMS[1]),
        "key 1 (entry 1): negative quota -1"
    );
    for i in [2, 3, 5] {
        let json = ORDERS_AND_PROBLEMS[i];
        assert_eq!(
            message(json),
            "key 1 (entry 1): unknown group \"gold\"",
            "{json}"
        );
    }
    // Its quota is checked before its group.
    assert_eq!(
        message(ORDERS_AND_PROBLEMS[4]),
        "key 1 (entry 1): negative quota -1"
    );
    assert!(message(ORDERS_AND_PROBLEMS[7]).contains("unknown field `kee`"));
    assert!(message(ORDERS_AND_PROBLEMS[8]).contains("ratio must be >= 0"));
    assert!(message(ORDERS_AND_PROBLEMS[9]).contains("needs a ratio or a price"));
    assert!(message(ORDERS_AND_PROBLEMS[10]).contains("quota_per_unit"));
    assert_eq!(
        message(ORDERS_AND_PROBLEMS[11]),
        "key 1 (entry 2): duplicate id"
    );
    // Accounts after the keys: the keys are theirs.
    let t = table(ORDERS_AND_PROBLEMS[20]).unwrap();
    let a = t.lookup(&key_digest(b"b")).unwrap();
    assert_eq!(&*t.account_of(a).unwrap().id, "acme");
    for i in [21, 22] {
        assert_eq!(
            message(ORDERS_AND_PROBLEMS[i]),
            "key 2 (entry 2): account \"acme\" allows at most 1 keys (max_keys)"
        );
    }
    assert_eq!(
        message(ORDERS_AND_PROBLEMS[23]),
        "key 1 (entry 1): unknown account \"nope\""
    );
    assert_eq!(
        message(ORDERS_AND_PROBLEMS[24]),
        "key 1 (entry 1): unknown account \"acme\""
    );
    // An account's problem is reported before any key's.
    assert!(message(ORDERS_AND_PROBLEMS[25]).starts_with("account \"acme\""));
    // The group's limits apply to its keys that set none, whichever comes first.
    let t = table(ORDERS_AND_PROBLEMS[28]).unwrap();
    let a = t.lookup(&key_digest(b"a")).unwrap();
    assert!(!a.policy.as_ref().unwrap().limits.is_empty());
    assert!(message(ORDERS_AND_PROBLEMS[30]).starts_with("group \"vip\""));
}

/// Hands out its bytes 1 to 7 at a time.
struct Trickle<'a>(&'a [u8]);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.0.len() % 7 + 1).min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// Counts how often the file is opened.
fn read_counting<'a>(
    json: &'a str,
    opened: &'a std::cell::Cell<usize>,
) -> impl FnMut() -> std::io::Result<&'a [u8]> + 'a {
    move || {
        opened.set(opened.get() + 1);
        Ok(json.as_bytes())
    }
}

#[test]
fn a_file_is_loaded_in_pieces_as_from_memory() {
    // Larger than one read, so key entries are cut between pieces.
    let keys: Vec<String> = (0..3000)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"key {i}","key_sha256":"{}","quota":{i},"models":["m{}"],"allow_ips":["10.0.0.0/8"]{}}}"#,
                digest_hex(&key_digest(format!("k{i}").as_bytes())),
                i % 3,
                if i % 5 == 0 { r#","account":"acme""# } else { "" }
            )
        })
        .collect();
    let big = format!(
        r#"{{"revision":3,"groups":{{"default":{{}}}},"keys":[{}],"accounts":{{"acme":{{}}}}}}"#,
        keys.join(",\n")
    );
    let mut files: Vec<String> = ORDERS_AND_PROBLEMS.iter().map(|s| s.to_string()).collect();
    files.push(big.clone());
    files.push(big.replace("\"quota\":2999", "\"quota\":-2999"));
    files.push(big.replace("\"quota\":2999", "\"qouta\":2999"));
    files.push(format!("{}  ", &big[..big.len() - 1]));
    for json in &files {
        let opened = std::cell::Cell::new(0);
        let read = KeyTable::from_reader(read_counting(json, &opened), "keys.json", 0);
        if let Ok(t) = &read {
            assert_eq!(t.source_digest, <[u8; 32]>::from(Sha256::digest(json)));
        }
        let from_memory = KeyTable::from_json(json.as_bytes(), "keys.json");
        assert_eq!(
            table_verdict(read.map_err(|e| e.to_string())),
            table_verdict(from_memory.map_err(|e| e.to_string())),
            "{}",
            &json[..json.len().min(80)]
        );
    }
    let opened = std::cell::Cell::new(0);
    let message = KeyTable::from_reader(read_counting(&files[files.len() - 1], &opened), "k", 0)
        .unwrap_err()
        .message;
    assert!(
        message.contains("trailing") || message.contains("EOF"),
        "{message}"
    );

    // An ordinary file is read once, even cut into pieces of a few bytes; one whose accounts
    // come after its keys is read twice (the keys compiled on the second read).
    let ordinary = big
        .replace(r#","account":"acme""#, "")
        .replace(r#","accounts":{"acme":{}}"#, "");
    let opened = std::cell::Cell::new(0);
    let t = KeyTable::from_reader(read_counting(&ordinary, &opened), "k", 3000).unwrap();
    assert_eq!((t.len(), opened.get()), (3000, 1));
    let t = KeyTable::from_reader(|| Ok(Trickle(ordinary.as_bytes())), "k", 0).unwrap();
    assert_eq!(t.len(), 3000);
    let opened = std::cell::Cell::new(0);
    let t = KeyTable::from_reader(read_counting(&big, &opened), "k", 0).unwrap();
    assert_eq!((t.len(), opened.get()), (3000, 2));
    assert_eq!(t.records().filter(|k| k.policy.is_some()).count(), 600);
    let summary = SyncFileSummary::of_reader(Trickle(big.as_bytes())).unwrap();
    assert_eq!(summary.keys_hint, 3000);
    assert_eq!(summary.digest, <[u8; 32]>::from(Sha256::digest(&big)));
}

#[test]
fn a_file_that_changes_between_two_reads_is_refused() {
    let before = r#"{"keys":[{"id":1,"key":"a","account":"acme"}],"accounts":{"acme":{}}}"#;
    let after = r#"{"keys":[{"id":1,"key":"b","account":"acme"}],"accounts":{"acme":{}}}"#;
    let mut reads = [before, after].into_iter();
    let open = || Ok(reads.next().unwrap_or(after).as_bytes());
    let e = KeyTable::from_reader(open, "k", 0).unwrap_err();
    assert_eq!(e.message, "the file changed while it was read");
}
