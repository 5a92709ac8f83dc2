//! Parses arbitrary `WWW-Authenticate` headers as a registry client does
//! (`core/src/registry/auth.rs`): nothing may panic, and a Bearer challenge built from the input
//! must give back the realm, service and scope it was built with.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_core::registry::auth::{parse_challenge, Challenge};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_challenge(&text);

    // The input as realm, service and scope (split on NUL), quoted as RFC 9110 says.
    let mut parts = text.splitn(3, '\0');
    let (realm, service, scope) = (parts.next().unwrap_or(""), parts.next(), parts.next());
    let mut header = format!("Bearer realm=\"{}\"", quote(realm));
    if let Some(s) = service {
        header += &format!(",service=\"{}\"", quote(s));
    }
    if let Some(s) = scope {
        header += &format!(", scope=\"{}\"", quote(s));
    }
    let want = Challenge::Bearer { realm: realm.into(), service: service.map(Into::into), scope: scope.map(Into::into) };
    assert_eq!(parse_challenge(&header), Some(want), "header {header:?}");

    // Unquoted, as some registries send it: the value runs to the next comma, trimmed.
    if !realm.contains(',') && !realm.trim_start().starts_with('"') {
        let got = parse_challenge(&format!("bearer realm={realm}"));
        let Some(Challenge::Bearer { realm: got, .. }) = got else { panic!("no Bearer challenge for realm {realm:?}") };
        assert_eq!(got, realm.trim());
    }
});

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
