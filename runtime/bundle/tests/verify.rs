// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Build, sign and verify real components, and every way verification must
//! refuse a bundle.

mod common;

use common::{CREATED, EXPIRES, HELLO_MANIFEST, NOW, hello_component, sections};
use provd_bundle::container::RawBundle;
use provd_bundle::{
    BundleError, MAX_BUNDLE_BYTES, MAX_CLOCK_SKEW_SECS, MAX_SIGNATURES, PublicKey, SigningKey,
    build, sign, verify,
};
use serde_json::{Value, json};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn signed(keys: &[&SigningKey]) -> Vec<u8> {
    let mut bundle = build(HELLO_MANIFEST, &hello_component(), CREATED, EXPIRES).unwrap();
    for k in keys {
        bundle = sign(&bundle, k).unwrap();
    }
    bundle
}

/// Replaces the header with `header` (bytes as given), keeping the component
/// and the signatures.
fn with_header(bundle: &[u8], header: &[u8]) -> Vec<u8> {
    let raw = RawBundle::parse(bundle).unwrap();
    RawBundle { header, ..raw }.to_bytes().unwrap()
}

/// The header as JSON.
fn header_json(bundle: &[u8]) -> Value {
    serde_json::from_slice(RawBundle::parse(bundle).unwrap().header).unwrap()
}

/// Canonical text of a JSON value (serde_json's default map is sorted).
fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// Signs `header` with `key` outside the library, as a trusted but careless
/// or malicious signer could, and puts it in a bundle with `component`.
fn sign_raw(header: &[u8], component: &[u8], key: &SigningKey) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let seed = [key_seed(key); 32];
    let sig = ed25519_dalek::SigningKey::from_bytes(&seed).sign(header).to_bytes();
    let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
    let list = canonical(&json!([{ "key-id": key.key_id(), "signature": hex }]));
    RawBundle { header, component, signatures: &list }.to_bytes().unwrap()
}

fn key_seed(key: &SigningKey) -> u8 {
    (0..=255u8).find(|s| SigningKey::from_bytes(&[*s; 32]).key_id() == key.key_id()).unwrap()
}

#[test]
fn build_sign_verify_round_trip() {
    let k = key(1);
    let component = hello_component();
    let bundle = sign(&build(HELLO_MANIFEST, &component, CREATED, EXPIRES).unwrap(), &k).unwrap();
    let v = verify(&bundle, &[k.public_key()], NOW).unwrap();
    assert_eq!(v.name, "hello");
    assert_eq!(v.version, semver::Version::new(0, 1, 0));
    assert_eq!(v.manifest.name, "hello");
    assert_eq!(v.manifest_text, HELLO_MANIFEST);
    assert_eq!(v.component, component);
    assert_eq!(v.digest, format!("blake3:{}", blake3::hash(&component).to_hex()));
    assert_eq!(v.signer, k.key_id());
    assert_eq!((v.created, v.expires), (CREATED, EXPIRES));
    // The bundle starts with the magic and the format version.
    assert_eq!(&bundle[..10], b"PROVDBND\x01\x00");
}

#[test]
fn the_header_is_canonical_json_with_the_derived_capabilities() {
    let bundle = signed(&[]);
    let raw = RawBundle::parse(&bundle).unwrap();
    let h = header_json(&bundle);
    assert_eq!(raw.header, canonical(&h).as_slice());
    assert_eq!(
        h["capabilities"],
        json!({"log": {"max-bytes": 65536}, "progress": {}, "hashing": {"max-input-bytes": 1048576}})
    );
    assert_eq!(h["format"], "provd-bundle/1");
    assert_eq!(h["target"], "provd:plugin/provisioner@0.1.0");
    assert_eq!(h["manifest"], HELLO_MANIFEST);
    assert_eq!(h["component-size"], raw.component.len());
    let keys: Vec<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "capabilities",
            "component-digest",
            "component-size",
            "created",
            "expires",
            "format",
            "manifest",
            "name",
            "target",
            "version"
        ]
    );
    assert_eq!(raw.signatures, b"[]");
}

#[test]
fn signing_twice_with_one_key_changes_nothing() {
    let k = key(1);
    let once = signed(&[&k]);
    assert_eq!(sign(&once, &k).unwrap(), once);
    let list: Value = serde_json::from_slice(RawBundle::parse(&once).unwrap().signatures).unwrap();
    assert_eq!(list[0]["key-id"], k.key_id());
    assert_eq!(list[0]["signature"].as_str().unwrap().len(), 128);
}

#[test]
fn a_changed_component_byte_breaks_the_digest() {
    let k = key(1);
    let mut bundle = signed(&[&k]);
    let [_, component, _] = sections(&bundle);
    bundle[component.end - 1] ^= 0x40;
    let err = verify(&bundle, &[k.public_key()], NOW).unwrap_err();
    assert!(matches!(err, BundleError::DigestMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.starts_with("component digest blake3:"), "{text}");
    assert!(text.contains("does not match the header's blake3:"), "{text}");
}

#[test]
fn a_changed_header_breaks_the_signature() {
    let k = key(1);
    let bundle = signed(&[&k]);
    let h = header_json(&bundle);
    let mut tampered = Vec::new();
    // More capabilities than signed.
    let mut v = h.clone();
    v["capabilities"]["vm"] = json!({});
    tampered.push(v);
    // A larger parameter.
    let mut v = h.clone();
    v["capabilities"]["hashing"]["max-input-bytes"] = json!(1u64 << 40);
    tampered.push(v);
    // Another manifest (its capabilities and the header's changed together).
    let mut v = h.clone();
    v["manifest"] = json!(HELLO_MANIFEST.replace("max-bytes = 65536", "max-bytes = 65537"));
    v["capabilities"]["log"]["max-bytes"] = json!(65537);
    tampered.push(v);
    // A higher version, in the header and the manifest.
    let mut v = h.clone();
    v["version"] = json!("0.2.0");
    v["manifest"] = json!(HELLO_MANIFEST.replace("0.1.0", "0.2.0"));
    tampered.push(v);
    // A later expiry.
    let mut v = h.clone();
    v["expires"] = json!(EXPIRES + 1);
    tampered.push(v);
    for v in tampered {
        let bundle = with_header(&bundle, &canonical(&v));
        let err = verify(&bundle, &[k.public_key()], NOW).unwrap_err();
        assert_eq!(err, BundleError::BadSignature { index: 0, key_id: k.key_id() }, "{v}");
        assert_eq!(err.to_string(), format!("signature 0 by key {}: does not verify", k.key_id()));
    }
}

#[test]
fn a_signature_by_an_unknown_key_is_not_enough() {
    let (a, b) = (key(1), key(2));
    let bundle = signed(&[&a]);
    let err = verify(&bundle, &[b.public_key()], NOW).unwrap_err();
    assert_eq!(
        err,
        BundleError::NoTrustedSignature { present: vec![a.key_id()], trusted: vec![b.key_id()] }
    );
    assert!(err.to_string().contains("no signature by a trusted key"), "{err}");
    let unsigned = signed(&[]);
    let err = verify(&unsigned, &[a.public_key()], NOW).unwrap_err();
    assert_eq!(err.to_string(), "bundle is not signed");
    let err = verify(&bundle, &[], NOW).unwrap_err();
    assert!(matches!(err, BundleError::NoTrustedSignature { .. }), "{err}");
}

#[test]
fn a_forged_signature_claiming_a_trusted_key_is_refused() {
    let k = key(1);
    let bundle = signed(&[]);
    let raw = RawBundle::parse(&bundle).unwrap();
    let mut random = [0u8; 64];
    getrandom::fill(&mut random).unwrap();
    let mut forgeries: Vec<String> =
        vec![random.iter().map(|b| format!("{b:02x}")).collect(), "0".repeat(128)];
    // A valid signature of other bytes by the right key.
    let other = sign_raw(b"something else", raw.component, &k);
    let list: Value = serde_json::from_slice(RawBundle::parse(&other).unwrap().signatures).unwrap();
    forgeries.push(list[0]["signature"].as_str().unwrap().to_string());
    for sig in forgeries {
        let list = canonical(&json!([{ "key-id": k.key_id(), "signature": sig }]));
        let forged = RawBundle { signatures: &list, ..raw }.to_bytes().unwrap();
        let err = verify(&forged, &[k.public_key()], NOW).unwrap_err();
        assert_eq!(err, BundleError::BadSignature { index: 0, key_id: k.key_id() });
    }
}

#[test]
fn two_signatures_one_untrusted() {
    let (a, b) = (key(1), key(2));
    let bundle = signed(&[&a, &b]);
    assert_eq!(verify(&bundle, &[b.public_key()], NOW).unwrap().signer, b.key_id());
    assert_eq!(verify(&bundle, &[a.public_key()], NOW).unwrap().signer, a.key_id());
    assert_eq!(verify(&bundle, &[b.public_key(), a.public_key()], NOW).unwrap().signer, a.key_id());
    // An untrusted signature that does not verify is ignored...
    let raw = RawBundle::parse(&bundle).unwrap();
    let mut list: Value = serde_json::from_slice(raw.signatures).unwrap();
    list[1]["signature"] = json!("ab".repeat(64));
    let list = canonical(&list);
    let broken_b = RawBundle { signatures: &list, ..raw }.to_bytes().unwrap();
    assert_eq!(verify(&broken_b, &[a.public_key()], NOW).unwrap().signer, a.key_id());
    // ...but not when its key is trusted, even though another verifies.
    let err = verify(&broken_b, &[a.public_key(), b.public_key()], NOW).unwrap_err();
    assert_eq!(err, BundleError::BadSignature { index: 1, key_id: b.key_id() });
}

#[test]
fn signatures_are_bounded_and_unique() {
    let mut bundle = signed(&[]);
    for seed in 1..=8 {
        bundle = sign(&bundle, &key(seed)).unwrap();
    }
    assert_eq!(verify(&bundle, &[key(8).public_key()], NOW).unwrap().signer, key(8).key_id());
    assert_eq!(sign(&bundle, &key(9)).unwrap_err(), BundleError::TooManySignatures(9));
    // Two entries for one key are refused even when both are the same.
    let k = key(1);
    let one = signed(&[&k]);
    let raw = RawBundle::parse(&one).unwrap();
    let mut list: Value = serde_json::from_slice(raw.signatures).unwrap();
    let entry = list[0].clone();
    list.as_array_mut().unwrap().push(entry);
    let list = canonical(&list);
    let twice = RawBundle { signatures: &list, ..raw }.to_bytes().unwrap();
    assert_eq!(
        verify(&twice, &[k.public_key()], NOW).unwrap_err(),
        BundleError::DuplicateSignature(k.key_id())
    );
    // Unknown fields and malformed ids are refused.
    for bad in [
        json!([{ "key-id": k.key_id(), "signature": "00".repeat(64), "note": "x" }]),
        json!([{ "key-id": "XYZ", "signature": "00".repeat(64) }]),
        json!([{ "key-id": k.key_id(), "signature": "00" }]),
        json!({}),
    ] {
        let list = canonical(&bad);
        let b = RawBundle { signatures: &list, ..raw }.to_bytes().unwrap();
        let err = verify(&b, &[k.public_key()], NOW).unwrap_err();
        assert!(matches!(err, BundleError::Signatures(_)), "{bad}: {err}");
    }
}

#[test]
fn every_truncation_is_refused_without_panic() {
    let k = key(1);
    let bundle = signed(&[&k]);
    for len in 0..bundle.len() {
        let err = verify(&bundle[..len], &[k.public_key()], NOW).unwrap_err();
        assert!(
            matches!(
                err,
                BundleError::BadMagic
                    | BundleError::Truncated { .. }
                    | BundleError::TooLarge { .. }
            ),
            "{len}: {err}"
        );
    }
    let mut longer = bundle.clone();
    longer.push(0);
    assert_eq!(verify(&longer, &[k.public_key()], NOW).unwrap_err(), BundleError::TrailingBytes(1));
}

#[test]
fn every_bit_flip_is_refused() {
    // Framing, header and signatures in full, the component sampled: every
    // byte of a bundle is covered by a length, the signature or the digest.
    let k = key(1);
    let bundle = signed(&[&k]);
    let [_, component, _] = sections(&bundle);
    let positions =
        (0..bundle.len()).filter(|i| !component.contains(i) || (i - component.start) % 97 == 0);
    let mut tried = 0;
    for i in positions {
        // One bit per byte, a different one for consecutive bytes.
        let bit = 1u8 << (i % 8);
        let mut b = bundle.clone();
        b[i] ^= bit;
        assert!(verify(&b, &[k.public_key()], NOW).is_err(), "flip {bit:#x} at {i} accepted");
        tried += 1;
    }
    assert!(tried > 500, "{tried}");
}

#[test]
fn lying_lengths_cost_nothing() {
    let k = key(1);
    let bundle = signed(&[&k]);
    let [header, component, signatures] = sections(&bundle);
    let cases = [
        (header.start - 4, u32::MAX, "header"),
        (header.start - 4, (1 << 20) + 1, "header"),
        (component.start - 4, u32::MAX, "component"),
        (signatures.start - 4, u32::MAX, "signatures"),
        (signatures.start - 4, (16 << 10) + 1, "signatures"),
    ];
    for (at, len, what) in cases {
        let mut b = bundle.clone();
        b[at..at + 4].copy_from_slice(&len.to_le_bytes());
        let err = verify(&b, &[k.public_key()], NOW).unwrap_err();
        assert!(matches!(err, BundleError::TooLarge { what: w, .. } if w == what), "{what}: {err}");
    }
    // A length within its limit but past the end of the file.
    let mut b = bundle.clone();
    let at = component.start - 4;
    b[at..at + 4].copy_from_slice(&(1u32 << 25).to_le_bytes());
    let err = verify(&b, &[k.public_key()], NOW).unwrap_err();
    assert!(matches!(err, BundleError::Truncated { section: "component", .. }), "{err}");
    // A file over the bundle limit is refused before anything is read.
    let huge = vec![0u8; MAX_BUNDLE_BYTES as usize + 1];
    assert!(matches!(verify(&huge, &[], NOW), Err(BundleError::TooLarge { what: "bundle", .. })));
    // Other magic, other format version.
    let mut b = bundle.clone();
    b[0] = b'X';
    assert_eq!(verify(&b, &[], NOW).unwrap_err(), BundleError::BadMagic);
    let mut b = bundle.clone();
    b[8] = 2;
    assert_eq!(verify(&b, &[], NOW).unwrap_err(), BundleError::UnsupportedVersion(2));
}

#[test]
fn validity_period() {
    let k = key(1);
    let bundle = signed(&[&k]);
    let trusted = [k.public_key()];
    assert!(verify(&bundle, &trusted, EXPIRES).is_ok());
    let err = verify(&bundle, &trusted, EXPIRES + 1).unwrap_err();
    assert_eq!(err, BundleError::Expired { expires: EXPIRES, now: EXPIRES + 1 });
    assert!(err.to_string().starts_with("bundle expired at 2026-06-15T15:06:40Z"), "{err}");
    assert!(verify(&bundle, &trusted, CREATED - MAX_CLOCK_SKEW_SECS).is_ok());
    let err = verify(&bundle, &trusted, CREATED - MAX_CLOCK_SKEW_SECS - 1).unwrap_err();
    assert!(matches!(err, BundleError::CreatedInFuture { .. }), "{err}");
    assert!(matches!(
        build(HELLO_MANIFEST, &hello_component(), EXPIRES, CREATED),
        Err(BundleError::BadValidity { .. })
    ));
}

#[test]
fn a_trusted_signer_cannot_make_an_inconsistent_bundle_pass() {
    let k = key(1);
    let trusted = [k.public_key()];
    let bundle = signed(&[]);
    let raw = RawBundle::parse(&bundle).unwrap();
    let h = header_json(&bundle);

    let mut v = h.clone();
    v["capabilities"]["vm"] = json!({});
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::ManifestMismatch { field: "capabilities", .. }), "{err}");

    let mut v = h.clone();
    v["name"] = json!("other");
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::ManifestMismatch { field: "name", .. }), "{err}");

    let mut v = h.clone();
    v["version"] = json!("0.1.1");
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::ManifestMismatch { field: "version", .. }), "{err}");

    let mut v = h.clone();
    v["format"] = json!("provd-bundle/2");
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::Field { field: "format", .. }), "{err}");

    let mut v = h.clone();
    v["target"] = json!("provd:plugin/provisioner@0.2.0");
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::Field { field: "target", .. }), "{err}");

    let mut v = h.clone();
    v["component-size"] = json!(raw.component.len() + 1);
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::SizeMismatch { .. }), "{err}");

    let mut v = h.clone();
    v["extra"] = json!(1);
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");

    // Not canonical: whitespace, and a duplicate key a lenient parser would
    // read either way.
    let pretty = serde_json::to_vec_pretty(&h).unwrap();
    let err = verify(&sign_raw(&pretty, raw.component, &k), &trusted, NOW).unwrap_err();
    assert_eq!(err, BundleError::NotCanonical("header"));
    let text = String::from_utf8(canonical(&h)).unwrap();
    let dup = text.replacen("{\"capabilities\":", "{\"capabilities\":{},\"capabilities\":", 1);
    let err = verify(&sign_raw(dup.as_bytes(), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::Header(_) | BundleError::NotCanonical(_)), "{err}");

    // An invalid manifest, consistently signed.
    let mut v = h.clone();
    v["manifest"] = json!(HELLO_MANIFEST.replace("[limits]", "[limits]\ncpu = 1"));
    let err = verify(&sign_raw(&canonical(&v), raw.component, &k), &trusted, NOW).unwrap_err();
    assert!(matches!(err, BundleError::Manifest(_)), "{err}");

    // sign() refuses all of these too, so the library never signs them.
    let mut v = h.clone();
    v["capabilities"]["vm"] = json!({});
    let unsigned = with_header(&bundle, &canonical(&v));
    assert!(matches!(sign(&unsigned, &k), Err(BundleError::ManifestMismatch { .. })));
}

#[test]
fn build_refuses_what_is_not_a_plugin() {
    let component = hello_component();
    let core = wat_module();
    let err = build(HELLO_MANIFEST, &core, CREATED, EXPIRES).unwrap_err();
    assert!(err.to_string().contains("core WebAssembly module, not a component"), "{err}");
    let err = build(HELLO_MANIFEST, b"\x7fELF", CREATED, EXPIRES).unwrap_err();
    assert!(err.to_string().contains("not WebAssembly"), "{err}");
    let mut broken = component.clone();
    broken.truncate(component.len() / 2);
    let err = build(HELLO_MANIFEST, &broken, CREATED, EXPIRES).unwrap_err();
    assert!(err.to_string().starts_with("component: invalid component"), "{err}");
    let err =
        build("name = \"Hello\"\nversion = \"1.0.0\"\n", &component, CREATED, EXPIRES).unwrap_err();
    assert!(matches!(err, BundleError::Manifest(_)), "{err}");
    let big = format!("{HELLO_MANIFEST}#{}\n", "x".repeat(64 << 10));
    let err = build(&big, &component, CREATED, EXPIRES).unwrap_err();
    assert!(matches!(err, BundleError::TooLarge { what: "manifest", .. }), "{err}");
}

/// The smallest core module: magic and version 1.
fn wat_module() -> Vec<u8> {
    vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]
}

#[test]
fn public_keys_round_trip_through_lines() {
    let k = key(7);
    let line = k.public_key().to_line("alice@example").unwrap();
    assert!(line.starts_with("provd-ed25519 "), "{line}");
    assert_eq!(PublicKey::from_line(&line).unwrap(), k.public_key());
    assert_eq!(k.key_id().len(), 16);
    assert_eq!(
        k.key_id(),
        blake3::hash(&k.public_key().to_bytes()).to_hex().as_str()[..16].to_string()
    );
}

/// What a generated hostile bundle must be refused as.
type Check = Box<dyn Fn(&BundleError) -> bool>;

fn is(pred: impl Fn(&BundleError) -> bool + 'static) -> Check {
    Box::new(pred)
}

/// Hostile bundles generated from one good one: every header field
/// removed, nulled or of the wrong type; versions, validity windows,
/// capabilities and component facts that disagree with what was signed;
/// non-canonical spellings; signature lists malformed in every way; the
/// container's magic, version and lengths lying. Most are signed by the
/// trusted key (a careless or captured signer), so that each is refused by
/// the check it targets and not merely for a missing signature. Each ends in
/// the expected refusal.
#[test]
fn a_generated_corpus_of_hostile_bundles_each_refused_as_expected() {
    let k = key(1);
    let trusted = [k.public_key()];
    let bundle = signed(&[]);
    let raw = RawBundle::parse(&bundle).unwrap();
    let component = raw.component.to_vec();
    let h = header_json(&bundle);
    let signed_header = |v: &Value| sign_raw(&canonical(v), &component, &k);
    let mut cases: Vec<(String, Vec<u8>, Check)> = Vec::new();

    // Every header field: gone, null, or of another JSON type.
    let fields: Vec<String> = h.as_object().unwrap().keys().cloned().collect();
    for f in &fields {
        let mut gone = h.clone();
        gone.as_object_mut().unwrap().remove(f);
        let name = f.clone();
        cases.push((
            format!("header without `{f}`"),
            signed_header(&gone),
            is(move |e| e.to_string().contains(&format!("missing field `{name}`"))),
        ));
        for (label, value) in
            [("null", json!(null)), ("a list", json!([])), ("a float", json!(1.5))]
        {
            let mut v = h.clone();
            v[f] = value;
            // A float is never canonical; the others fail the header's
            // shape, or (the capabilities, kept as JSON) differ from the
            // manifest's.
            cases.push((
                format!("header `{f}` is {label}"),
                signed_header(&v),
                is(|e| {
                    matches!(
                        e,
                        BundleError::Header(_)
                            | BundleError::NotCanonical(_)
                            | BundleError::ManifestMismatch { .. }
                    )
                }),
            ));
        }
    }
    // Versions: malformed, or not the manifest's.
    for version in ["0.1", "v0.1.0", "0.1.0-", "01.0.0", "", " 0.1.0", "0.1.0\n", "1.0.0"] {
        let mut v = h.clone();
        v["version"] = json!(version);
        cases.push((
            format!("version {version:?}"),
            signed_header(&v),
            is(|e| {
                matches!(
                    e,
                    BundleError::ManifestMismatch { field: "version", .. }
                        | BundleError::Field { field: "version", .. }
                        | BundleError::Header(_)
                )
            }),
        ));
    }
    for name in ["Hello", "hello ", "other", "", "../hello", "hello/x"] {
        let mut v = h.clone();
        v["name"] = json!(name);
        cases.push((
            format!("name {name:?}"),
            signed_header(&v),
            is(|e| {
                matches!(
                    e,
                    BundleError::ManifestMismatch { field: "name", .. }
                        | BundleError::Field { field: "name", .. }
                        | BundleError::Header(_)
                )
            }),
        ));
    }
    // Validity windows.
    let window = |created: u64, expires: u64| {
        let mut v = h.clone();
        v["created"] = json!(created);
        v["expires"] = json!(expires);
        signed_header(&v)
    };
    cases.push((
        "expired an hour ago".into(),
        window(CREATED - 7200, NOW - 3600),
        is(|e| matches!(e, BundleError::Expired { .. })),
    ));
    cases.push((
        "expired a second ago".into(),
        window(CREATED, NOW - 1),
        is(|e| matches!(e, BundleError::Expired { .. })),
    ));
    cases.push((
        "created a day ahead".into(),
        window(NOW + 86_400, NOW + 2 * 86_400),
        is(|e| matches!(e, BundleError::CreatedInFuture { .. })),
    ));
    cases.push((
        "created past the clock skew".into(),
        window(NOW + MAX_CLOCK_SKEW_SECS + 1, EXPIRES),
        is(|e| matches!(e, BundleError::CreatedInFuture { .. })),
    ));
    cases.push((
        "expires before it is created".into(),
        window(NOW, NOW - 10),
        is(|e| matches!(e, BundleError::BadValidity { .. } | BundleError::Expired { .. })),
    ));
    cases.push((
        "created at the end of time".into(),
        window(u64::MAX, u64::MAX),
        is(|e| matches!(e, BundleError::CreatedInFuture { .. } | BundleError::Header(_))),
    ));
    for created in [json!(-1), json!("1750000000"), json!(1e10)] {
        let mut v = h.clone();
        v["created"] = created.clone();
        cases.push((
            format!("created {created}"),
            signed_header(&v),
            is(|e| matches!(e, BundleError::Header(_) | BundleError::NotCanonical(_))),
        ));
    }
    // Capabilities that are not the manifest's: each one added, each
    // declared one removed or widened.
    for cap in ["images", "dedup", "partitions", "vm"] {
        let mut v = h.clone();
        v["capabilities"][cap] = json!({});
        cases.push((
            format!("capability {cap} added"),
            signed_header(&v),
            is(|e| {
                matches!(
                    e,
                    BundleError::ManifestMismatch { field: "capabilities", .. }
                        | BundleError::Header(_)
                )
            }),
        ));
    }
    let declared: Vec<String> = h["capabilities"].as_object().unwrap().keys().cloned().collect();
    for cap in &declared {
        let mut v = h.clone();
        v["capabilities"].as_object_mut().unwrap().remove(cap);
        cases.push((
            format!("capability {cap} removed"),
            signed_header(&v),
            is(|e| matches!(e, BundleError::ManifestMismatch { field: "capabilities", .. })),
        ));
        let mut v = h.clone();
        v["capabilities"][cap] = json!({"max-bytes": 1u64 << 40, "max-input-bytes": 1u64 << 40});
        cases.push((
            format!("capability {cap} widened"),
            signed_header(&v),
            is(|e| {
                matches!(
                    e,
                    BundleError::ManifestMismatch { field: "capabilities", .. }
                        | BundleError::Header(_)
                )
            }),
        ));
    }
    // The component: another digest, another size, other bytes.
    let digest = h["component-digest"].as_str().unwrap().to_string();
    for (i, replacement) in [(7, '0'), (20, 'f'), (digest.len() - 1, 'a')] {
        let mut d: Vec<char> = digest.chars().collect();
        d[i] = if d[i] == replacement { '1' } else { replacement };
        let mut v = h.clone();
        v["component-digest"] = json!(d.iter().collect::<String>());
        cases.push((
            format!("digest changed at {i}"),
            signed_header(&v),
            is(|e| matches!(e, BundleError::DigestMismatch { .. })),
        ));
    }
    for d in ["", "blake3:", "sha256:00", "BLAKE3:00"] {
        let mut v = h.clone();
        v["component-digest"] = json!(d);
        cases.push((
            format!("digest {d:?}"),
            signed_header(&v),
            is(|e| matches!(e, BundleError::DigestMismatch { .. } | BundleError::Field { .. })),
        ));
    }
    for size in [0, component.len() as u64 - 1, component.len() as u64 + 1, u64::MAX] {
        let mut v = h.clone();
        v["component-size"] = json!(size);
        cases.push((
            format!("component size {size}"),
            signed_header(&v),
            is(|e| matches!(e, BundleError::SizeMismatch { .. })),
        ));
    }
    // The component differs from the one the header names, signed by the
    // trusted key outside the library (sign() checks what it signs).
    let appended = [component.as_slice(), b"\0"].concat();
    let other = common::component(&["provd:plugin/log@0.1.0"], true);
    for (label, bytes) in [
        ("a byte appended to the component", &appended[..]),
        ("another component", &other[..]),
        ("an empty component", &b""[..]),
        ("the component cut by one byte", &component[..component.len() - 1]),
    ] {
        cases.push((
            label.into(),
            sign_raw(&canonical(&h), bytes, &k),
            is(|e| {
                matches!(e, BundleError::SizeMismatch { .. } | BundleError::DigestMismatch { .. })
            }),
        ));
    }
    // Canonical form.
    let text = String::from_utf8(canonical(&h)).unwrap();
    for (label, spelled) in [
        ("pretty-printed", String::from_utf8(serde_json::to_vec_pretty(&h).unwrap()).unwrap()),
        ("trailing newline", format!("{text}\n")),
        ("leading space", format!(" {text}")),
        ("byte-order mark", format!("\u{feff}{text}")),
        ("escaped letter", text.replacen("\"hello\"", "\"\\u0068ello\"", 1)),
        ("keys reversed", {
            let mut pairs: Vec<(String, Value)> =
                h.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            pairs.reverse();
            let inner: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                .collect();
            format!("{{{}}}", inner.join(","))
        }),
        (
            "integer as float",
            text.replacen(
                &format!("\"created\":{CREATED}"),
                &format!("\"created\":{CREATED}.0"),
                1,
            ),
        ),
        (
            "integer with exponent",
            text.replacen(&format!("\"created\":{CREATED}"), "\"created\":1.75e9", 1),
        ),
        (
            "duplicate key",
            text.replacen("{\"capabilities\":", "{\"capabilities\":{},\"capabilities\":", 1),
        ),
    ] {
        assert_ne!(spelled, text, "{label} changed nothing");
        cases.push((
            format!("header {label}"),
            sign_raw(spelled.as_bytes(), &component, &k),
            is(|e| matches!(e, BundleError::NotCanonical(_) | BundleError::Header(_))),
        ));
    }
    // Signatures.
    let good = signed(&[&k]);
    let raw_good = RawBundle::parse(&good).unwrap();
    let header_bytes = raw_good.header.to_vec();
    let entry: Value = serde_json::from_slice::<Value>(raw_good.signatures).unwrap()[0].clone();
    let sig_hex = entry["signature"].as_str().unwrap().to_string();
    let with_signatures = |list: &[u8]| {
        RawBundle { header: &header_bytes, component: &component, signatures: list }
            .to_bytes()
            .unwrap()
    };
    let unsigned_check = || {
        is(|e| {
            matches!(
                e,
                BundleError::NoTrustedSignature { .. }
                    | BundleError::Signatures(_)
                    | BundleError::BadSignature { .. }
                    | BundleError::NotCanonical(_)
                    | BundleError::DuplicateSignature(_)
                    | BundleError::TooManySignatures(_)
            )
        })
    };
    let mut lists: Vec<(String, Vec<u8>)> = vec![
        ("no signatures".into(), b"[]".to_vec()),
        ("not a list".into(), b"{}".to_vec()),
        ("not JSON".into(), b"[".to_vec()),
        ("empty section".into(), Vec::new()),
        (
            "signed by an untrusted key".into(),
            RawBundle::parse(&signed(&[&key(2)])).unwrap().signatures.to_vec(),
        ),
    ];
    let one = |e: Value| canonical(&json!([e]));
    let flipped = {
        let mut b = sig_hex.clone().into_bytes();
        b[0] = if b[0] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    for (label, e) in [
        (
            "signature one byte short",
            json!({"key-id": entry["key-id"], "signature": &sig_hex[..126]}),
        ),
        (
            "signature one byte long",
            json!({"key-id": entry["key-id"], "signature": format!("{sig_hex}00")}),
        ),
        (
            "signature in upper case",
            json!({"key-id": entry["key-id"], "signature": sig_hex.to_uppercase()}),
        ),
        ("signature not hex", json!({"key-id": entry["key-id"], "signature": "zz".repeat(64)})),
        ("signature all zero", json!({"key-id": entry["key-id"], "signature": "00".repeat(64)})),
        ("signature with a flipped bit", json!({"key-id": entry["key-id"], "signature": flipped})),
        (
            "signature under another key id",
            json!({"key-id": key(2).key_id(), "signature": sig_hex}),
        ),
        (
            "signature with an extra field",
            json!({"key-id": entry["key-id"], "signature": sig_hex, "note": "x"}),
        ),
        ("signature without a key id", json!({"signature": sig_hex})),
        ("signature without a signature", json!({"key-id": entry["key-id"]})),
        ("key id of another type", json!({"key-id": 1, "signature": sig_hex})),
    ] {
        lists.push((label.into(), one(e)));
    }
    lists.push(("the same signature twice".into(), canonical(&json!([entry, entry]))));
    let many: Vec<Value> = (0..=MAX_SIGNATURES as u8)
        .map(|i| json!({"key-id": key(i + 10).key_id(), "signature": sig_hex}))
        .collect();
    lists.push(("one signature over the limit".into(), canonical(&Value::Array(many))));
    lists.push((
        "signatures pretty-printed".into(),
        serde_json::to_vec_pretty(&json!([entry])).unwrap(),
    ));
    for (label, list) in lists {
        cases.push((label, with_signatures(&list), unsigned_check()));
    }
    // The container.
    let lengths = sections(&good);
    let mut bad = |label: &str, f: &dyn Fn(&mut Vec<u8>), check: Check| {
        let mut b = good.clone();
        f(&mut b);
        cases.push((label.into(), b, check));
    };
    bad("no magic", &|b| b[0] = b'X', is(|e| matches!(e, BundleError::BadMagic)));
    bad(
        "lower-case magic",
        &|b| b[..8].copy_from_slice(b"provdbnd"),
        is(|e| matches!(e, BundleError::BadMagic)),
    );
    for version in [0u16, 2, 255, u16::MAX] {
        bad(
            &format!("format version {version}"),
            &|b| b[8..10].copy_from_slice(&version.to_le_bytes()),
            is(|e| matches!(e, BundleError::UnsupportedVersion(_))),
        );
    }
    for (i, range) in lengths.iter().enumerate() {
        let at = range.start - 4;
        let len = range.len() as u32;
        for (label, value) in
            [("one more", len + 1), ("one less", len.saturating_sub(1)), ("the largest", u32::MAX)]
        {
            bad(
                &format!("section {i} length {label}"),
                &|b| b[at..at + 4].copy_from_slice(&value.to_le_bytes()),
                is(|_| true),
            );
        }
    }
    bad(
        "a byte after the last section",
        &|b| b.push(0),
        is(|e| matches!(e, BundleError::TrailingBytes(1))),
    );
    bad("only the magic", &|b| b.truncate(8), is(|e| matches!(e, BundleError::Truncated { .. })));
    bad(
        "empty file",
        &|b| b.clear(),
        is(|e| matches!(e, BundleError::Truncated { .. } | BundleError::BadMagic)),
    );

    let mut wrong = Vec::new();
    for (what, bytes, check) in &cases {
        match verify(bytes, &trusted, NOW) {
            Ok(_) => wrong.push(format!("{what}: verified")),
            Err(e) if !check(&e) => wrong.push(format!("{what}: refused as {e}")),
            Err(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} ended otherwise:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    assert!(cases.len() >= 100, "only {} generated bundles", cases.len());
    println!("{} generated hostile bundles refused as expected", cases.len());
}
