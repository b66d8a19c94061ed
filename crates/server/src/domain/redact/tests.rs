//! The redaction corpus: every kind of secret, what must stay untouched,
//! idempotence, and output printed a line at a time.

use super::*;

const TASKMESH_HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Asserts that `input` redacts to `expected`, and that redacting again
/// changes nothing.
#[track_caller]
fn check(input: &str, expected: &str) {
    let once = redact(input);
    assert_eq!(once, expected, "redacting {input:?}");
    let twice = redact(&once);
    assert!(
        matches!(twice, Cow::Borrowed(_)),
        "redacting {once:?} again changed it to {twice:?}"
    );
}

#[track_caller]
fn untouched(input: &str) {
    let out = redact(input);
    assert!(matches!(out, Cow::Borrowed(_)), "{input:?} became {out:?}");
}

#[test]
fn clean_text_is_borrowed() {
    let text = "cargo test: 42 passed; 0 failed\nfinished in 1.2s";
    match redact(text) {
        Cow::Borrowed(s) => assert!(std::ptr::eq(s, text)),
        Cow::Owned(s) => panic!("allocated for clean text: {s:?}"),
    }
    untouched("");
}

#[test]
fn openai_and_anthropic_keys() {
    check(
        "export OPENAI=sk-abcdefghijklmnopqrstuvwxyz012345 # mine",
        "export OPENAI=[REDACTED:api_key] # mine",
    );
    check(
        "key sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz_0123456789-abc done",
        "key [REDACTED:api_key] done",
    );
    check(
        "\"sk-proj-AbCdEfGhIjKlMnOpQrSt0123456789\"",
        "\"[REDACTED:api_key]\"",
    );
    check(
        "sk-abcdefghijklmnopqrst1234 at the start",
        "[REDACTED:api_key] at the start",
    );
}

#[test]
fn aws_access_key_ids() {
    check(
        "id AKIAIOSFODNN7EXAMPLE, session ASIAY34FZKBOKMUTVV7A.",
        "id [REDACTED:aws_key], session [REDACTED:aws_key].",
    );
}

#[test]
fn aws_secret_assignments_keep_the_key() {
    check(
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nregion = us-east-1",
        "aws_secret_access_key = [REDACTED:aws_key]\nregion = us-east-1",
    );
    check(
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY=[REDACTED:aws_key]",
    );
    check(
        r#"{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}"#,
        r#"{"SecretAccessKey": "[REDACTED:aws_key]"}"#,
    );
}

#[test]
fn github_tokens() {
    for prefix in ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"] {
        check(
            &format!("token {prefix}abcdefghijklmnopqrstuvwxyzABCDEFGHIJ here"),
            "token [REDACTED:github_token] here",
        );
    }
    check(
        "GH github_pat_11ABCDEFG0123456789abc_defghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW end",
        "GH [REDACTED:github_token] end",
    );
}

#[test]
fn gitlab_slack_google_stripe_npm() {
    check(
        "glpat-AbCdEfGhIjKlMnOpQrSt is it",
        "[REDACTED:gitlab_token] is it",
    );
    check(
        "slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp ok",
        "slack [REDACTED:slack_token] ok",
    );
    check(
        "slack (xoxp-1234567890-abcdefghij)",
        "slack ([REDACTED:slack_token])",
    );
    check(
        "maps AIzaSyA1234567890abcdefghijklmnopqrstuv ok",
        "maps [REDACTED:google_api_key] ok",
    );
    check(
        "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc and rk_live_AbCdEf0123456789 ok",
        "stripe [REDACTED:stripe_key] and [REDACTED:stripe_key] ok",
    );
    check(
        "//registry.npmjs.org/:_authToken npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789 x",
        "//registry.npmjs.org/:_authToken [REDACTED:npm_token] x",
    );
}

#[test]
fn taskmesh_tokens() {
    check(
        &format!("user tmu_{TASKMESH_HEX}, daemon tmd_{TASKMESH_HEX}, viewer tmv_{TASKMESH_HEX}."),
        "user [REDACTED:taskmesh_token], daemon [REDACTED:taskmesh_token], viewer [REDACTED:taskmesh_token].",
    );
}

#[test]
fn jwts() {
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
    check(
        &format!("cookie: session={jwt}; Path=/"),
        "cookie: session=[REDACTED:jwt]; Path=/",
    );
    check(&format!("({jwt})"), "([REDACTED:jwt])");
}

#[test]
fn bearer_keeps_the_scheme() {
    check(
        "curl -H 'Authorization: Bearer abc123' https://api.example.com",
        "curl -H 'Authorization: Bearer [REDACTED:bearer]' https://api.example.com",
    );
    check(
        "> authorization: bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln\n< 200",
        "> authorization: bearer [REDACTED:bearer]\n< 200",
    );
    check(
        "sent bearer 0123456789abcdefABCDEF== upstream",
        "sent bearer [REDACTED:bearer] upstream",
    );
    check(
        r#"headers = {"Authorization": "Bearer tok.en-123"}"#,
        r#"headers = {"Authorization": "Bearer [REDACTED:bearer]"}"#,
    );
}

#[test]
fn basic_auth_header() {
    check(
        "Authorization: Basic dXNlcjpodW50ZXIy\n",
        "Authorization: Basic [REDACTED:basic_auth]\n",
    );
}

#[test]
fn url_passwords_keep_user_and_host() {
    check(
        "connecting to postgres://app:s3cr3t!@db.internal:5432/main ...",
        "connecting to postgres://app:[REDACTED:password]@db.internal:5432/main ...",
    );
    check(
        "git clone https://oauth2:glpat-x@gitlab.com/org/repo.git",
        "git clone https://oauth2:[REDACTED:password]@gitlab.com/org/repo.git",
    );
    check(
        "REDIS_URL=redis://:hunter2@cache:6379",
        "REDIS_URL=redis://:[REDACTED:password]@cache:6379",
    );
}

#[test]
fn private_key_blocks_are_replaced_whole() {
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
               b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
               QyNTUxOQAAACDm0y6c9xJ0b1q9o0qKq9dS1eYtq2kz3m8nqXwz3l2xVwAAAJgAAAAA\n\
               -----END OPENSSH PRIVATE KEY-----";
    check(
        &format!("before\n{key}\nafter"),
        "before\n[REDACTED:private_key]\nafter",
    );
    for label in ["RSA ", "EC ", "", "ENCRYPTED ", "PGP "] {
        let block = if label == "PGP " { " BLOCK" } else { "" };
        check(
            &format!(
                "x -----BEGIN {label}PRIVATE KEY{block}-----\r\nProc-Type: 4,ENCRYPTED\r\n\r\nMIIEow==\r\n-----END {label}PRIVATE KEY{block}----- y"
            ),
            "x [REDACTED:private_key] y",
        );
    }
}

#[test]
fn a_private_key_printed_line_by_line_is_redacted_whole() {
    let lines = [
        "writing the key:",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW",
        "QyNTUxOQAAACDn2pB6iYq9P5fQb2vYyZ9X0F1uXk1H7nT0z4mJkq5uGgAAAJgx9Ww5MfVs",
        "-----END OPENSSH PRIVATE KEY-----",
        "done",
    ];
    let mut in_key = false;
    let out: Vec<String> = lines
        .iter()
        .map(|l| redact_in_stream(l, &mut in_key).into_owned())
        .collect();
    assert_eq!(
        out,
        [
            "writing the key:",
            "[REDACTED:private_key]",
            "[REDACTED:private_key]",
            "[REDACTED:private_key]",
            "[REDACTED:private_key]",
            "done",
        ]
    );
    assert!(!in_key);
    // A whole block in one message leaves nothing open.
    let whole = "a -----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY----- b";
    assert_eq!(
        redact_in_stream(whole, &mut in_key),
        "a [REDACTED:private_key] b"
    );
    assert!(!in_key);
}

#[test]
fn cut_short_private_keys() {
    check(
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234\nabcdEFGH+/==",
        "[REDACTED:private_key]",
    );
    check(
        "MIIEowIBAAKCAQEA1234\nabcdEFGH+/==\n-----END RSA PRIVATE KEY-----\n$ ls",
        "[REDACTED:private_key]\n$ ls",
    );
    // A header mentioned in code is not a key.
    untouched(r#"if line == "-----BEGIN RSA PRIVATE KEY-----" {"#);
}

#[test]
fn generic_assignments_keep_the_key() {
    check("password=hunter2222", "password=[REDACTED:password]");
    check(
        r#"{"password": "correct horse battery", "user": "bob"}"#,
        r#"{"password": "[REDACTED:password]", "user": "bob"}"#,
    );
    check(
        "DB_PASSWORD='p@ss w0rd!' next",
        "DB_PASSWORD='[REDACTED:password]' next",
    );
    check("api_key: abcd1234efgh", "api_key: [REDACTED:api_key]");
    check(
        "curl -H \"X-Api-Key: 0123456789abcdef\"",
        "curl -H \"X-Api-Key: [REDACTED:api_key]\"",
    );
    check(
        "client_secret=Zx9-abc_def.ghi end",
        "client_secret=[REDACTED:secret] end",
    );
    check("SECRET := 'abcdefgh12'", "SECRET := '[REDACTED:secret]'");
    check(
        "secretKey: abcdefgh12 private_key=abcdefgh12",
        "secretKey: [REDACTED:secret] private_key=[REDACTED:secret]",
    );
    check(
        "GITHUB_TOKEN=whatever1234 make",
        "GITHUB_TOKEN=[REDACTED:token] make",
    );
    check(
        "url?access_token=abcdefgh12345678",
        "url?access_token=[REDACTED:token]",
    );
    check(
        "config = { token => 'abcdefgh12345678' }",
        "config = { token => '[REDACTED:token]' }",
    );
}

#[test]
fn a_keyed_token_keeps_its_key_name() {
    check(
        "token=ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
        "token=[REDACTED:token]",
    );
    check(
        "OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwxyz",
        "OPENAI_API_KEY=[REDACTED:api_key]",
    );
}

#[test]
fn several_secrets_in_one_text() {
    let input = format!(
        "step 1: export GH=ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ\n\
         step 2: aws id AKIAIOSFODNN7EXAMPLE and sk-abcdefghijklmnopqrstuvwx\n\
         step 3: psql postgresql://admin:topsecret@localhost/db -c 'select 1'\n\
         step 4: tmd_{TASKMESH_HEX} then password: hunter2222\n\
         done\n"
    );
    check(
        &input,
        "step 1: export GH=[REDACTED:github_token]\n\
         step 2: aws id [REDACTED:aws_key] and [REDACTED:api_key]\n\
         step 3: psql postgresql://admin:[REDACTED:password]@localhost/db -c 'select 1'\n\
         step 4: [REDACTED:taskmesh_token] then password: [REDACTED:password]\n\
         done\n",
    );
}

#[test]
fn adjacent_secrets() {
    check(
        "AKIAIOSFODNN7EXAMPLE,AKIAIOSFODNN7EXAMPLF",
        "[REDACTED:aws_key],[REDACTED:aws_key]",
    );
    check(
        "sk-abcdefghijklmnopqrst sk-abcdefghijklmnopqrst",
        "[REDACTED:api_key] [REDACTED:api_key]",
    );
}

#[test]
fn nul_bytes_are_removed() {
    assert_eq!(redact("a\0b\0\0c"), "abc");
    assert!(matches!(redact("a\0b"), Cow::Owned(_)));
    assert_eq!(redact("\0"), "");
    // A NUL cannot split a secret out of sight.
    check("sk-abcdefghij\0klmnopqrstuvwxyz", "[REDACTED:api_key]");
    check(
        "é\0ü sk-abcdefghijklmnopqrstuvwxyz",
        "éü [REDACTED:api_key]",
    );
}

#[test]
fn ordinary_text_is_untouched() {
    for text in [
        "task 0191d6f4-4c1e-7b6a-9f3e-2a1b3c4d5e6f finished",
        "HEAD is now at 4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39 fix: typo",
        "a skeleton crew; task-sk-1 and task-sk-implement-the-login-flow",
        "disk-abcdefghijklmnopqrstuvwxyz is full",
        "SGVsbG8sIHdvcmxkISBUaGlzIGlzIGp1c3QgYmFzZTY0IHRleHQu==",
        "eyJhbGciOiJIUzI1NiJ9 is a header, eyJ.eyJ is not a token",
        "see https://github.com/org/repo and git@github.com:org/repo.git",
        "ssh://git@github.com/org/repo and http://localhost:8080/path?x=1",
        "password:",
        "password:\n  valueFrom: secretKeyRef",
        "password = \"\"",
        "password=short",
        "\"input_tokens\": 1234567890, \"max_tokens\": 8192000000",
        "token_count=123456789 password_hash=abcdefghijk",
        "use a bearer token; Bearer authentication is fine",
        "WWW-Authenticate: Bearer realm=\"example\"",
        "Authorization: Bearer $TOKEN",
        "AKIAIOSFODNN7EXAMPLEX is too long to be a key id",
        "tmu_0123 is too short; PWD=/home/user/project",
        "npm_config_registry=https://registry.npmjs.org/",
        "[REDACTED:api_key] and password=[REDACTED:password]",
        "日本語のテキスト with Ünïcödé and emoji 🦀",
    ] {
        untouched(text);
    }
}

#[test]
fn redaction_is_idempotent() {
    let inputs = [
        format!("tmu_{TASKMESH_HEX}"),
        "https://u:p@h password=abcdefghij Bearer 0123456789abcdefgh".to_string(),
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----".to_string(),
        "{\"token\": \"eyJa.eyJb.c\", \"api_key\": \"sk-abcdefghijklmnopqrstu\"}".to_string(),
    ];
    for input in &inputs {
        let once = redact(input).into_owned();
        assert_ne!(&once, input);
        assert_eq!(redact(&once), once);
        assert!(matches!(redact(&once), Cow::Borrowed(_)));
    }
}

#[test]
fn a_mebibyte_of_clean_output() {
    let line = "running 12 tests in src/domain (ok) 0191d6f4-4c1e-7b6a-9f3e-2a1b3c4d5e6f é\n";
    let text = line.repeat((1 << 20) / line.len() + 1);
    assert!(text.len() >= 1 << 20);
    assert!(matches!(redact(&text), Cow::Borrowed(_)));

    let with_secret = format!("{text}sk-abcdefghijklmnopqrstuvwxyz\n");
    let out = redact(&with_secret);
    assert!(out.starts_with(&text[..1000]));
    assert!(out.ends_with("[REDACTED:api_key]\n"));
    assert_eq!(out.len(), text.len() + "[REDACTED:api_key]\n".len());
}

/// A secret glued to the end of another (here the bearer token's `=`
/// padding took the separator the key needed) is found on a second pass,
/// so redacting again never finds more.
#[test]
fn a_secret_right_after_another_is_redacted_too() {
    let t = "Authorization: Bearer abcdefghmjklmnopqrstuvwxyz012345expoI_KEY=sk-ant-api03-abcdEfI_gSFODNN7EXAMPLE done";
    let once = redact(t);
    assert!(!once.contains("sk-ant-api03"), "{once}");
    assert!(once.ends_with(" done"), "{once}");
    assert_eq!(redact(&once), once);
}
