//! Tests of signing, verifying and the keys file.

use super::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::secret_file::SecretFileError;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const SECRET2: &[u8] = b"another-secret-of-enough-length";
const NOW: u64 = 1_700_000_000;
const NONCE: &str = "abcdefghijklmnop_-0123";
const PATH: &str = "/v1/ports/443/nodes?drain=true";
const BODY: &[u8] = br#"{"address":"10.0.0.5","port":30443}"#;

fn keys() -> Keys {
    Keys::from_pairs([(DEFAULT_KEY_ID.to_string(), SECRET.to_vec())]).unwrap()
}

fn verifier() -> Verifier {
    Verifier::new(keys(), DEFAULT_WINDOW)
}

/// Owned header values for one request, signed with `secret`.
struct Req {
    key: Option<String>,
    ts: Option<String>,
    nonce: Option<String>,
    sig: Option<String>,
}

impl Req {
    fn signed(key: Option<&str>, secret: &[u8], ts: u64, nonce: &str) -> Req {
        Req {
            key: key.map(str::to_string),
            ts: Some(ts.to_string()),
            nonce: Some(nonce.to_string()),
            sig: Some(sign(secret, "PUT", PATH, ts, nonce, BODY)),
        }
    }

    fn good() -> Req {
        Req::signed(None, SECRET, NOW, NONCE)
    }

    fn headers(&self) -> AuthHeaders<'_> {
        AuthHeaders {
            key_id: self.key.as_deref(),
            timestamp: self.ts.as_deref(),
            nonce: self.nonce.as_deref(),
            signature: self.sig.as_deref(),
        }
    }
}

fn check(v: &Verifier, r: &Req, now: u64) -> Result<String, AuthFailure> {
    v.verify("PUT", PATH, &r.headers(), BODY, now)
        .map(|a| a.key_id)
}

fn reason(v: &Verifier, r: &Req, now: u64) -> AuthFailureReason {
    let failure = check(v, r, now).expect_err("request should be refused");
    assert!(!failure.message.is_empty());
    assert!(
        !failure
            .message
            .contains(std::str::from_utf8(SECRET).unwrap()),
        "secret leaked: {}",
        failure.message
    );
    failure.reason
}

#[test]
fn requests_signed_before_start_are_refused() {
    let v = Verifier::new(
        Keys::from_pairs([("default".to_string(), b"0123456789abcdef".to_vec())]).unwrap(),
        Duration::from_secs(300),
    );
    let body = b"{}";
    let sig = |ts: u64, nonce: &str| sign(b"0123456789abcdef", "PUT", "/p", ts, nonce, body);
    let s1 = sig(1000, "nonce-aaaaaaaaaaaa");
    let h1 = AuthHeaders {
        key_id: None,
        timestamp: Some("1000"),
        nonce: Some("nonce-aaaaaaaaaaaa"),
        signature: Some(&s1),
    };
    assert!(v.verify("PUT", "/p", &h1, body, 1001).is_ok());
    // A restart: a fresh verifier that refuses what was signed before it started.
    let v = Verifier::new(
        Keys::from_pairs([("default".to_string(), b"0123456789abcdef".to_vec())]).unwrap(),
        Duration::from_secs(300),
    );
    v.refuse_signed_before(1002);
    let e = v.verify("PUT", "/p", &h1, body, 1003).unwrap_err();
    assert_eq!(e.reason, AuthFailureReason::StaleTimestamp);
    let s2 = sig(1003, "nonce-bbbbbbbbbbbb");
    let h2 = AuthHeaders {
        key_id: None,
        timestamp: Some("1003"),
        nonce: Some("nonce-bbbbbbbbbbbb"),
        signature: Some(&s2),
    };
    assert!(v.verify("PUT", "/p", &h2, body, 1003).is_ok());
}

#[test]
fn good_signature_passes() {
    assert_eq!(check(&verifier(), &Req::good(), NOW).unwrap(), "default");
}

#[test]
fn explicit_key_header_passes() {
    let r = Req::signed(Some("default"), SECRET, NOW, NONCE);
    assert_eq!(check(&verifier(), &r, NOW).unwrap(), "default");
}

#[test]
fn signed_headers_round_trip() {
    let v = verifier();
    let hs = signed_headers("default", SECRET, "POST", "/v1/x?a=1", b"{}", NOW);
    let get = |name| hs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
    let headers = AuthHeaders {
        key_id: get(HEADER_KEY),
        timestamp: get(HEADER_TIMESTAMP),
        nonce: get(HEADER_NONCE),
        signature: get(HEADER_SIGNATURE),
    };
    assert_eq!(hs.len(), 4);
    assert_eq!(
        v.verify("POST", "/v1/x?a=1", &headers, b"{}", NOW)
            .unwrap()
            .key_id,
        "default"
    );
    // Two calls give two different nonces.
    let hs2 = signed_headers("default", SECRET, "POST", "/v1/x?a=1", b"{}", NOW);
    assert_ne!(hs[2].1, hs2[2].1);
}

#[test]
fn each_missing_header_is_refused() {
    let v = verifier();
    for which in 0..3 {
        let mut r = Req::good();
        match which {
            0 => r.ts = None,
            1 => r.nonce = None,
            _ => r.sig = None,
        }
        let f = check(&v, &r, NOW).unwrap_err();
        assert_eq!(f.reason, AuthFailureReason::MissingHeader);
        let name = [HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE][which];
        assert!(f.message.contains(name), "{}", f.message);
    }
    // The key header is optional, so its absence is not an error (tested above).
}

#[test]
fn malformed_headers_are_refused() {
    let v = verifier();
    let malformed = |edit: &dyn Fn(&mut Req)| {
        let mut r = Req::good();
        edit(&mut r);
        reason(&v, &r, NOW)
    };
    let m = AuthFailureReason::MalformedHeader;
    // Timestamp.
    for ts in [
        "",
        "abc",
        "17e8",
        "-1700000000",
        "+1700000000",
        " 1700000000",
        "1.5",
    ] {
        assert_eq!(malformed(&|r| r.ts = Some(ts.into())), m, "ts {ts:?}");
    }
    assert_eq!(malformed(&|r| r.ts = Some("9".repeat(21))), m);
    assert_eq!(
        malformed(&|r| r.ts = Some("99999999999999999999".into())),
        m
    ); // > u64
       // Nonce: too short, too long, bad characters.
    assert_eq!(malformed(&|r| r.nonce = Some("a".repeat(15))), m);
    assert_eq!(malformed(&|r| r.nonce = Some("a".repeat(65))), m);
    for bad in [
        "abcdefghijklmnop.",
        "abcdefghijklmnop ",
        "abcdefghijklmnop/",
        "abcdéfghijklmnop",
    ] {
        assert_eq!(malformed(&|r| r.nonce = Some(bad.into())), m, "{bad:?}");
    }
    // Signature: no prefix, uppercase hex, wrong length, not hex.
    let good_sig = Req::good().sig.unwrap();
    let hex_part = good_sig.strip_prefix("sha256=").unwrap().to_string();
    assert_eq!(malformed(&|r| r.sig = Some(hex_part.clone())), m);
    assert_eq!(malformed(&|r| r.sig = Some(format!("sha1={hex_part}"))), m);
    assert_eq!(
        malformed(&|r| r.sig = Some(format!("SHA256={hex_part}"))),
        m
    );
    assert_eq!(
        malformed(&|r| r.sig = Some(format!("sha256={}", hex_part.to_uppercase()))),
        m
    );
    assert_eq!(
        malformed(&|r| r.sig = Some(format!("sha256={}", &hex_part[..62]))),
        m
    );
    assert_eq!(
        malformed(&|r| r.sig = Some(format!("sha256={hex_part}00"))),
        m
    );
    assert_eq!(
        malformed(&|r| r.sig = Some(format!("sha256={}", "g".repeat(64)))),
        m
    );
    // Key id.
    assert_eq!(malformed(&|r| r.key = Some(String::new())), m);
    assert_eq!(malformed(&|r| r.key = Some("bad key".into())), m);
    assert_eq!(malformed(&|r| r.key = Some("k".repeat(65))), m);
    // Nonce at the bounds is fine.
    for n in ["a".repeat(16), "Z".repeat(64)] {
        assert!(check(&v, &Req::signed(None, SECRET, NOW, &n), NOW).is_ok());
    }
}

#[test]
fn unknown_key_is_refused() {
    let r = Req::signed(Some("other"), SECRET, NOW, NONCE);
    let f = check(&verifier(), &r, NOW).unwrap_err();
    assert_eq!(f.reason, AuthFailureReason::UnknownKey);
    assert!(f.message.contains("other"), "{}", f.message);
}

#[test]
fn timestamp_window() {
    let v = verifier();
    // The request's timestamp is 301 s before / after the agent's clock.
    let early = Req::signed(None, SECRET, NOW - 301, "nonce-early-000001");
    let late = Req::signed(None, SECRET, NOW + 301, "nonce-late-0000001");
    assert_eq!(reason(&v, &early, NOW), AuthFailureReason::StaleTimestamp);
    assert_eq!(reason(&v, &late, NOW), AuthFailureReason::StaleTimestamp);
    // Exactly 300 s either way is fine.
    let edge_early = Req::signed(None, SECRET, NOW - 300, "nonce-early-000002");
    let edge_late = Req::signed(None, SECRET, NOW + 300, "nonce-late-0000002");
    assert!(check(&v, &edge_early, NOW).is_ok());
    assert!(check(&v, &edge_late, NOW).is_ok());
    // The window is configurable.
    let narrow = Verifier::new(keys(), Duration::from_secs(10));
    let r = Req::signed(None, SECRET, NOW - 11, NONCE);
    assert_eq!(reason(&narrow, &r, NOW), AuthFailureReason::StaleTimestamp);
    assert!(check(&narrow, &Req::signed(None, SECRET, NOW - 10, NONCE), NOW).is_ok());
}

#[test]
fn replay_is_refused_within_window_and_accepted_after() {
    let v = verifier();
    assert!(check(&v, &Req::good(), NOW).is_ok());
    // The same request again, and later within the window.
    assert_eq!(
        reason(&v, &Req::good(), NOW),
        AuthFailureReason::ReplayedNonce
    );
    assert_eq!(
        reason(&v, &Req::good(), NOW + 300),
        AuthFailureReason::ReplayedNonce
    );
    // The same nonce with a fresh timestamp, while the first is still remembered.
    let fresh = Req::signed(None, SECRET, NOW + 200, NONCE);
    assert_eq!(
        reason(&v, &fresh, NOW + 200),
        AuthFailureReason::ReplayedNonce
    );
    // Once NOW + window has passed, the first request is stale and its nonce forgotten.
    assert_eq!(
        reason(&v, &Req::good(), NOW + 301),
        AuthFailureReason::StaleTimestamp
    );
    let later = Req::signed(None, SECRET, NOW + 301, NONCE);
    assert!(check(&v, &later, NOW + 301).is_ok());
    assert_eq!(
        v.nonces.lock().unwrap().len(),
        1,
        "the old entry was pruned"
    );
}

#[test]
fn nonces_are_per_key() {
    let two = Keys::from_pairs([
        ("default".to_string(), SECRET.to_vec()),
        ("k2".to_string(), SECRET2.to_vec()),
    ])
    .unwrap();
    let v = Verifier::new(two, DEFAULT_WINDOW);
    assert!(check(&v, &Req::good(), NOW).is_ok());
    assert!(check(&v, &Req::signed(Some("k2"), SECRET2, NOW, NONCE), NOW).is_ok());
}

#[test]
fn bad_signature_does_not_burn_the_nonce() {
    let v = verifier();
    let forged = Req::signed(None, b"not-the-right-secret-at-all", NOW, NONCE);
    assert_eq!(reason(&v, &forged, NOW), AuthFailureReason::BadSignature);
    assert!(check(&v, &Req::good(), NOW).is_ok());
}

#[test]
fn tampering_is_refused() {
    let v = verifier();
    let r = Req::good();
    let bad = |method: &str, path: &str, body: &[u8]| {
        v.verify(method, path, &r.headers(), body, NOW)
            .unwrap_err()
            .reason
    };
    let b = AuthFailureReason::BadSignature;
    assert_eq!(
        bad("PUT", PATH, br#"{"address":"10.0.0.6","port":30443}"#),
        b
    );
    assert_eq!(bad("PUT", PATH, b""), b);
    assert_eq!(bad("PUT", "/v1/ports/443/nodes?drain=false", BODY), b);
    assert_eq!(bad("PUT", "/v1/ports/443/nodes", BODY), b);
    assert_eq!(bad("PUT", "/v1/ports/444/nodes?drain=true", BODY), b);
    assert_eq!(bad("DELETE", PATH, BODY), b);
    // A different timestamp or nonce than the one signed.
    let mut r2 = Req::good();
    r2.ts = Some((NOW + 1).to_string());
    assert_eq!(reason(&v, &r2, NOW), b);
    let mut r3 = Req::good();
    r3.nonce = Some("zzzzzzzzzzzzzzzzzzzz".into());
    assert_eq!(reason(&v, &r3, NOW), b);
    // A signature off by one bit.
    let mut r4 = Req::good();
    let sig = r4.sig.take().unwrap();
    let last = sig.chars().last().unwrap();
    let flipped = if last == '0' { '1' } else { '0' };
    r4.sig = Some(format!("{}{flipped}", &sig[..sig.len() - 1]));
    assert_eq!(reason(&v, &r4, NOW), b);
    // None of this burned the nonce.
    assert!(check(&v, &r, NOW).is_ok());
}

#[test]
fn key_rotation() {
    let both = Keys::from_pairs([
        ("old".to_string(), SECRET.to_vec()),
        ("new".to_string(), SECRET2.to_vec()),
    ])
    .unwrap();
    let v = Verifier::new(both, DEFAULT_WINDOW);
    let old = |n: &str| Req::signed(Some("old"), SECRET, NOW, n);
    let new = |n: &str| Req::signed(Some("new"), SECRET2, NOW, n);
    assert_eq!(check(&v, &old("nonce-000000000001"), NOW).unwrap(), "old");
    assert_eq!(check(&v, &new("nonce-000000000001"), NOW).unwrap(), "new");
    // Signing with the other key's secret does not pass.
    let cross = Req::signed(Some("new"), SECRET, NOW, "nonce-000000000002");
    assert_eq!(reason(&v, &cross, NOW), AuthFailureReason::BadSignature);

    v.replace_keys(Keys::from_pairs([("new".to_string(), SECRET2.to_vec())]).unwrap());
    assert_eq!(
        reason(&v, &old("nonce-000000000003"), NOW),
        AuthFailureReason::UnknownKey
    );
    assert!(check(&v, &new("nonce-000000000003"), NOW).is_ok());
}

#[test]
fn full_nonce_cache_refuses_rather_than_forgets() {
    let v = Verifier::with_nonce_capacity(keys(), DEFAULT_WINDOW, 2);
    assert!(check(
        &v,
        &Req::signed(None, SECRET, NOW, "nonce-000000000001"),
        NOW
    )
    .is_ok());
    assert!(check(
        &v,
        &Req::signed(None, SECRET, NOW, "nonce-000000000002"),
        NOW
    )
    .is_ok());
    let third = Req::signed(None, SECRET, NOW, "nonce-000000000003");
    let f = check(&v, &third, NOW).unwrap_err();
    assert_eq!(f.reason, AuthFailureReason::ReplayedNonce);
    assert!(f.message.contains("full"), "{}", f.message);
    // The live nonces are still remembered.
    assert_eq!(
        reason(
            &v,
            &Req::signed(None, SECRET, NOW, "nonce-000000000001"),
            NOW
        ),
        AuthFailureReason::ReplayedNonce
    );
    // Once they expire there is room again.
    let later = Req::signed(None, SECRET, NOW + 301, "nonce-000000000003");
    assert!(check(&v, &later, NOW + 301).is_ok());
}

#[test]
fn reason_names() {
    use AuthFailureReason::*;
    let all = [
        MissingHeader,
        MalformedHeader,
        UnknownKey,
        StaleTimestamp,
        ReplayedNonce,
        BadSignature,
    ];
    let names: Vec<_> = all.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        [
            "missing_header",
            "malformed_header",
            "unknown_key",
            "stale_timestamp",
            "replayed_nonce",
            "bad_signature"
        ]
    );
}

// --- Wire format, checked independently --------------------------------------------------

/// HMAC-SHA256 of `data` with `key`, computed by `openssl dgst`; `None` if openssl is absent.
fn openssl_hmac(key: &str, data: &str) -> Option<String> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(data.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    // "SHA2-256(stdin)= <hex>" or "(stdin)= <hex>", depending on the version.
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().rsplit(' ').next()?.to_string())
}

#[test]
fn wire_format_test_vector() {
    let secret = "0123456789abcdef0123456789abcdef";
    let body = br#"{"port":443}"#;
    // sha256 of the body, from `printf '%s' '{"port":443}' | sha256sum`.
    let body_hex = "eef208f1371116733e8fbb68ba3987b34f61d576dc1f4cdf94f3b190ae93b926";
    assert_eq!(
        body_digest(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let sts = string_to_sign(
        "POST",
        "/v1/ports?x=1",
        "1700000000",
        "abcdefghijklmnop",
        &body_digest(body),
    );
    assert_eq!(
        sts,
        format!("POST\n/v1/ports?x=1\n1700000000\nabcdefghijklmnop\n{body_hex}")
    );
    let ours = sign(
        secret.as_bytes(),
        "POST",
        "/v1/ports?x=1",
        1_700_000_000,
        "abcdefghijklmnop",
        body,
    );
    // Recorded once with `openssl dgst -sha256 -hmac` and with Python's hmac module.
    assert_eq!(
        ours,
        "sha256=3ee87001a7d4fb66000b1cce72e879bfaebefe203737ffb3fddc5f76529a51a2"
    );
    match openssl_hmac(secret, &sts) {
        Some(theirs) => assert_eq!(ours, format!("sha256={theirs}")),
        None => eprintln!("openssl not available; skipped the live cross-check"),
    }
}

// --- Keys file ---------------------------------------------------------------------------

fn write_keys(dir: &tempfile::TempDir, text: &str, mode: u32) -> PathBuf {
    let path = dir.path().join("keys.toml");
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

const GOOD_FILE: &str = "# comment\ndefault = \"0123456789abcdef0123\"\n\
                         \"ci-2024.1\" = \"another-secret-of-enough-length\"\n";

#[test]
fn keys_file_0600_loads() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::load(&write_keys(&dir, GOOD_FILE, 0o600)).unwrap();
    assert_eq!(keys.ids().collect::<Vec<_>>(), ["ci-2024.1", "default"]);
    assert_eq!(keys.len(), 2);
    assert!(!keys.is_empty());
    assert_eq!(keys.secret("default"), Some(&b"0123456789abcdef0123"[..]));
    assert!(!format!("{keys:?}").contains("0123456789abcdef0123"));
    // 0400 is fine too.
    assert!(Keys::load(&write_keys(&dir, GOOD_FILE, 0o400)).is_ok());
}

#[test]
fn keys_file_open_to_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o640, 0o604, 0o660, 0o602, 0o620, 0o644] {
        let path = write_keys(&dir, GOOD_FILE, mode);
        let err = Keys::load(&path).unwrap_err();
        assert!(
            matches!(err, KeysError::File(SecretFileError::OpenToOthers { .. })),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn keys_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let load = |text: &str| Keys::load(&write_keys(&dir, text, 0o600)).unwrap_err();

    // Malformed TOML; the message must not quote the secret on the broken line.
    let err = load("default = \"0123456789abcdef-unterminated\n");
    assert!(
        matches!(err, KeysError::Malformed { line: Some(1), .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("unterminated"), "{err}");
    let err = load("a = \"0123456789abcdef0123\"\nnot toml at all\n");
    assert!(
        matches!(err, KeysError::Malformed { line: Some(2), .. }),
        "{err:?}"
    );
    assert!(matches!(
        load("default = \"0123456789abcdef0\"\ndefault = \"0123456789abcdef1\"\n"),
        KeysError::Malformed { .. }
    ));

    // Short and empty secrets, never quoted.
    let err = load("default = \"short-secret\"\n");
    assert!(
        matches!(*inner(&err), KeysError::ShortSecret { len: 12, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("keys.toml"), "{err}");
    assert!(!err.to_string().contains("short-secret"), "{err}");
    assert!(matches!(
        *inner(&load("default = \"\"\n")),
        KeysError::EmptySecret { .. }
    ));

    // Bad key ids.
    let err = load("\"bad key\" = \"0123456789abcdef0123\"\n");
    assert!(
        matches!(*inner(&err), KeysError::InvalidKeyId { .. }),
        "{err:?}"
    );
    let long = format!("{} = \"0123456789abcdef0123\"\n", "k".repeat(65));
    assert!(matches!(
        *inner(&load(&long)),
        KeysError::InvalidKeyId { .. }
    ));

    // Values that are not strings, tables, nothing at all.
    assert!(matches!(
        *inner(&load("default = 1234567890123456789\n")),
        KeysError::NotAString { .. }
    ));
    assert!(matches!(
        *inner(&load("default = [\"0123456789abcdef0123\"]\n")),
        KeysError::NotAString { .. }
    ));
    assert!(matches!(*inner(&load("# nothing\n")), KeysError::NoKeys));
    // An unquoted dotted id is a TOML table: the message says to quote it.
    let err = load("ci.2 = \"0123456789abcdef0123\"\n");
    assert!(
        matches!(*inner(&err), KeysError::UnknownField { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("quote"), "{err}");

    // A missing file.
    let err = Keys::load(&dir.path().join("absent.toml")).unwrap_err();
    assert!(matches!(err, KeysError::File(SecretFileError::Io { .. })));
    assert!(err.to_string().contains("absent.toml"));
    // A directory.
    assert!(matches!(
        Keys::load(dir.path()).unwrap_err(),
        KeysError::File(SecretFileError::NotRegular { .. })
    ));
}

fn inner(err: &KeysError) -> &KeysError {
    match err {
        KeysError::InFile { source, .. } => source,
        other => panic!("expected InFile, got {other:?}"),
    }
}

#[test]
fn from_pairs_validates() {
    let pair = |id: &str, s: &[u8]| (id.to_string(), s.to_vec());
    assert!(matches!(
        Keys::from_pairs([pair("a b", SECRET)]),
        Err(KeysError::InvalidKeyId { .. })
    ));
    assert!(matches!(
        Keys::from_pairs([pair("", SECRET)]),
        Err(KeysError::InvalidKeyId { .. })
    ));
    assert!(matches!(
        Keys::from_pairs([pair("a", b"")]),
        Err(KeysError::EmptySecret { .. })
    ));
    assert!(matches!(
        Keys::from_pairs([pair("a", &[b'x'; 15])]),
        Err(KeysError::ShortSecret { len: 15, .. })
    ));
    assert!(Keys::from_pairs([pair("a", &[b'x'; 16])]).is_ok());
    assert!(Keys::from_pairs([pair(&"k".repeat(64), SECRET)]).is_ok());
    assert!(matches!(
        Keys::from_pairs([pair("a", SECRET), pair("a", SECRET2)]),
        Err(KeysError::DuplicateKey { .. })
    ));
    assert!(matches!(
        Keys::from_pairs(Vec::new()),
        Err(KeysError::NoKeys)
    ));
}

#[test]
fn generate_file_writes_0600_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let generated = Keys::generate_file(&path, "default").unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let secret = generated.secret("default").unwrap();
    assert_eq!(secret.len(), 64);
    assert!(secret
        .iter()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let loaded = Keys::load(&path).unwrap();
    assert_eq!(loaded.secret("default"), Some(secret));
    // It refuses to overwrite an existing file, and to write a bad key id.
    assert!(matches!(
        Keys::generate_file(&path, "default"),
        Err(KeysError::Io { .. })
    ));
    assert_eq!(Keys::load(&path).unwrap().secret("default"), Some(secret));
    let other = dir.path().join("other.toml");
    assert!(matches!(
        Keys::generate_file(&other, "bad id"),
        Err(KeysError::InvalidKeyId { .. })
    ));
    assert!(!other.exists());
    // Two files get different secrets; a dotted id is quoted so it loads back.
    let second = Keys::generate_file(&other, "ci.2").unwrap();
    assert_ne!(second.secret("ci.2"), Some(secret));
    let loaded = Keys::load(&other).unwrap();
    assert_eq!(loaded.ids().collect::<Vec<_>>(), ["ci.2"]);
    assert_eq!(loaded.secret("ci.2"), second.secret("ci.2"));
}

#[test]
fn reload_swaps_keys_and_keeps_them_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_keys(&dir, GOOD_FILE, 0o600);
    let v = Verifier::new(Keys::load(&path).unwrap(), DEFAULT_WINDOW);
    let s1 = b"0123456789abcdef0123";
    assert!(check(&v, &Req::signed(None, s1, NOW, "nonce-000000000001"), NOW).is_ok());

    // Rotate: drop `default`, keep `ci-2024.1`.
    write_keys(
        &dir,
        "\"ci-2024.1\" = \"another-secret-of-enough-length\"\n",
        0o600,
    );
    assert_eq!(v.reload(&path).unwrap(), ["ci-2024.1"]);
    let r = Req::signed(None, s1, NOW, "nonce-000000000002");
    assert_eq!(reason(&v, &r, NOW), AuthFailureReason::UnknownKey);

    // A broken file leaves the current keys in place.
    write_keys(&dir, GOOD_FILE, 0o644);
    assert!(matches!(
        v.reload(&path),
        Err(KeysError::File(SecretFileError::OpenToOthers { .. }))
    ));
    let r = Req::signed(Some("ci-2024.1"), SECRET2, NOW, "nonce-000000000003");
    assert!(check(&v, &r, NOW).is_ok());
}

// --- Scoped keys -------------------------------------------------------------------------

const SCOPED_FILE: &str = "default = \"0123456789abcdef0123\"\n\
    [mqtt-sidecar]\n\
    secret = \"mqtt-secret-of-enough-length\"\n\
    frontend_ports = \"1883,8883\"\n\
    nodes = \"node-*\"\n\
    node_cidrs = \"10.0.0.0/8\"\n\
    may_delete_frontend = true\n\
    [\"web.sidecar\"]\n\
    secret = \"web-secret-of-enough-length\"\n\
    frontend_ports = \"80,443\"\n";

#[test]
fn scoped_keys_load_with_their_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::load(&write_keys(&dir, SCOPED_FILE, 0o600)).unwrap();
    assert_eq!(
        keys.ids().collect::<Vec<_>>(),
        ["default", "mqtt-sidecar", "web.sidecar"]
    );
    assert!(keys.scope("default").is_none());
    assert_eq!(
        keys.secret("mqtt-sidecar"),
        Some(&b"mqtt-secret-of-enough-length"[..])
    );
    let mqtt = keys.scope("mqtt-sidecar").unwrap();
    assert_eq!(mqtt.key_id, "mqtt-sidecar");
    assert!(mqtt.frontend_ports.contains(8883) && !mqtt.frontend_ports.contains(443));
    assert!(mqtt.sees_node("node-a") && !mqtt.sees_node("edge-1"));
    assert_eq!(mqtt.node_cidrs.as_ref().unwrap().to_string(), "10.0.0.0/8");
    assert!(mqtt.may_delete_frontend);
    // Optional fields: any node, any address the policy allows, no frontend removal.
    let web = keys.scope("web.sidecar").unwrap();
    assert!(web.nodes.is_none() && web.node_cidrs.is_none() && !web.may_delete_frontend);
    let debug = format!("{keys:?}");
    for secret in ["0123456789abcdef0123", "mqtt-secret", "web-secret"] {
        assert!(!debug.contains(secret), "{debug}");
    }
    assert!(debug.contains("mqtt-sidecar"), "{debug}");
}

#[test]
fn scoped_key_errors_name_the_key_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let load = |table: &str| {
        let text = format!("[mqtt-sidecar]\n{table}");
        Keys::load(&write_keys(&dir, &text, 0o600)).unwrap_err()
    };
    let secret = "secret = \"mqtt-secret-of-enough-length\"\n";
    let ports = "frontend_ports = \"1883\"\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("{secret}{ports}colour = \"blue\"\n"), "colour"),
        (format!("{secret}{ports}nodes = 7\n"), "nodes"),
        (format!("{secret}{ports}nodes = \"node-[ab]\"\n"), "nodes"),
        (format!("{secret}{ports}nodes = \"\"\n"), "nodes"),
        (
            format!("{secret}{ports}node_cidrs = \"10.0.0.0/33\"\n"),
            "node_cidrs",
        ),
        (
            format!("{secret}{ports}node_cidrs = [\"10.0.0.0/8\"]\n"),
            "node_cidrs",
        ),
        (format!("{secret}{ports}node_cidrs = \"\"\n"), "node_cidrs"),
        (
            format!("{secret}{ports}node_cidrs = \"any\"\n"),
            "node_cidrs",
        ),
        (
            format!("{secret}{ports}may_delete_frontend = \"no\"\n"),
            "may_delete_frontend",
        ),
        (
            format!("{secret}frontend_ports = \"0\"\n"),
            "frontend_ports",
        ),
        (
            format!("{secret}frontend_ports = \"9-1\"\n"),
            "frontend_ports",
        ),
        (format!("{secret}frontend_ports = 1883\n"), "frontend_ports"),
        (secret.to_string(), "frontend_ports"),
        (ports.to_string(), "secret"),
        (format!("secret = 1234567890123456\n{ports}"), "secret"),
    ];
    for (table, field) in cases {
        let err = load(&table);
        let msg = err.to_string();
        assert!(
            msg.contains("\"mqtt-sidecar\"") && msg.contains(field),
            "{table:?}: {msg}"
        );
        assert!(msg.contains("keys.toml"), "{msg}");
        assert!(!msg.contains("mqtt-secret"), "secret leaked: {msg}");
    }
    // The secret's own rules hold in a table too, still naming the key.
    let err = load(&format!("secret = \"short\"\n{ports}"));
    assert!(
        matches!(inner(&err), KeysError::ShortSecret { key_id, .. } if key_id == "mqtt-sidecar"),
        "{err:?}"
    );
    // A table's key id is checked like any other.
    let err = Keys::load(&write_keys(
        &dir,
        &format!("[\"bad id\"]\n{secret}{ports}"),
        0o600,
    ))
    .unwrap_err();
    assert!(
        matches!(*inner(&err), KeysError::InvalidKeyId { .. }),
        "{err:?}"
    );
}

#[test]
fn verify_returns_the_scope_and_reload_brings_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_keys(&dir, SCOPED_FILE, 0o600);
    let v = Verifier::new(Keys::load(&path).unwrap(), DEFAULT_WINDOW);
    let mqtt = b"mqtt-secret-of-enough-length";
    let verify = |nonce: &str| {
        let r = Req::signed(Some("mqtt-sidecar"), mqtt, NOW, nonce);
        v.verify("PUT", PATH, &r.headers(), BODY, NOW).unwrap()
    };
    let a = verify("nonce-000000000001");
    assert_eq!(a.key_id, "mqtt-sidecar");
    assert!(a.scope.as_ref().unwrap().frontend_ports.contains(1883));
    let r = Req::signed(None, b"0123456789abcdef0123", NOW, "nonce-000000000002");
    let unscoped = v.verify("PUT", PATH, &r.headers(), BODY, NOW).unwrap();
    assert!(unscoped.scope.is_none());

    write_keys(
        &dir,
        &SCOPED_FILE.replace("\"1883,8883\"", "\"443\""),
        0o600,
    );
    v.reload(&path).unwrap();
    let b = verify("nonce-000000000003");
    let scope = b.scope.unwrap();
    assert!(scope.frontend_ports.contains(443) && !scope.frontend_ports.contains(1883));
    // What was authenticated before keeps the scope it was checked with.
    assert!(a.scope.unwrap().frontend_ports.contains(1883));
}
#[test]
fn the_head_check_refuses_what_it_can_and_records_nothing() {
    let v = verifier();
    let r = Req::good();
    // Passes without the body, any number of times: the nonce is only recorded by `verify`.
    assert_eq!(
        v.check_head(&r.headers(), NOW).unwrap().key_id,
        DEFAULT_KEY_ID
    );
    assert!(v.check_head(&r.headers(), NOW).is_ok());
    assert_eq!(check(&v, &r, NOW).unwrap(), DEFAULT_KEY_ID);
    let reason = |r: &Req, now| v.check_head(&r.headers(), now).unwrap_err().reason;
    assert_eq!(reason(&r, NOW), AuthFailureReason::ReplayedNonce);
    let other = Req::signed(None, SECRET, NOW, "another-nonce-0123456");
    assert_eq!(reason(&other, NOW + 301), AuthFailureReason::StaleTimestamp);
    let stranger = Req::signed(Some("nobody"), SECRET, NOW, "another-nonce-0123456");
    assert_eq!(reason(&stranger, NOW), AuthFailureReason::UnknownKey);
    // A wrong signature is only seen with the body.
    let wrong = Req::signed(None, SECRET2, NOW, "another-nonce-0123456");
    assert!(v.check_head(&wrong.headers(), NOW).is_ok());
    assert_eq!(
        check(&v, &wrong, NOW).unwrap_err().reason,
        AuthFailureReason::BadSignature
    );
}
