//! The token-auth registry fixture scopes access per repository, as real registries do: a user
//! reads only the repositories granted to them, anonymous clients only public ones. The checks go
//! through the registry's 401 challenge and the token server, like any registry client.

use reqwest::{Method, StatusCode};
use shoal_tests::token_registry::{fetch, ADMIN_PASSWORD, ADMIN_USER};
use shoal_tests::{random_bytes, Agent, TokenRegistry};

const ALICE: Option<(&str, &str)> = Some(("alice", "alice-pw"));

async fn started() -> anyhow::Result<TokenRegistry> {
    TokenRegistry::start(&[("alice", "alice-pw", &["private/a"]), ("bob", "bob-pw", &["private/b"])], &["public/x"]).await
}

#[tokio::test]
async fn users_read_only_their_repositories_and_anonymous_clients_only_public_ones() -> anyhow::Result<()> {
    let reg = started().await?;
    let a = random_bytes(100_000, 1);
    let b = random_bytes(100_000, 2);
    let x = random_bytes(100_000, 3);
    let da = reg.push_blob("private/a", &a).await?;
    let db = reg.push_blob("private/b", &b).await?;
    let dx = reg.push_blob("public/x", &x).await?;
    let blob = |repo: &str, d: &str| format!("{}/v2/{repo}/blobs/{d}", reg.url());

    let resp = fetch(Method::GET, &blob("private/a", &da), ALICE).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await?.as_ref(), &a[..]);

    let refused = fetch(Method::GET, &blob("private/b", &db), ALICE).await?.status();
    assert!(matches!(refused, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "alice read private/b: {refused}");
    // The digest alone opens nothing: alice naming b's blob under her own repository gets no bytes.
    let elsewhere = fetch(Method::GET, &blob("private/a", &db), ALICE).await?.status();
    assert_eq!(elsewhere, StatusCode::NOT_FOUND, "b's blob under private/a");

    let resp = fetch(Method::GET, &blob("public/x", &dx), None).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await?.as_ref(), &x[..]);
    let anonymous = fetch(Method::GET, &blob("private/a", &da), None).await?.status();
    assert!(matches!(anonymous, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "anonymous read private/a: {anonymous}");
    let head = fetch(Method::HEAD, &blob("private/a", &da), Some(("bob", "bob-pw"))).await?.status();
    assert!(matches!(head, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "bob HEAD on private/a: {head}");

    let wrong = fetch(Method::GET, &blob("private/a", &da), Some(("alice", "guess"))).await;
    assert!(wrong.is_err_and(|e| e.to_string().contains("401")), "a wrong password gets no token");

    // The access log saw exactly the two reads that were allowed to send bytes.
    assert_eq!(reg.blob_fetches(&da).len(), 1, "{:?}", reg.hits());
    assert_eq!(reg.blob_fetches(&db).len(), 0, "{:?}", reg.hits());
    assert_eq!(reg.blob_bytes(&dx), x.len() as u64);

    // What the token server was asked and what it granted.
    let asked = reg.tokens.requests();
    let alice_b = asked.iter().find(|r| r.user.as_deref() == Some("alice") && r.scopes == ["repository:private/b:pull"]);
    assert_eq!(alice_b.map(|r| (r.status, r.granted.is_empty())), Some((200, true)), "{asked:?}");
    assert!(asked.iter().any(|r| r.user.as_deref() == Some("alice") && r.status == 401));

    // Access changes take effect for the next token.
    reg.tokens.set_access("alice", "private/b", true);
    assert_eq!(fetch(Method::GET, &blob("private/b", &db), ALICE).await?.status(), StatusCode::OK);
    reg.tokens.set_public("public/x", false);
    assert_eq!(fetch(Method::GET, &blob("public/x", &dx), None).await?.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn images_pushed_as_the_admin_are_pulled_by_granted_users_only() -> anyhow::Result<()> {
    let reg = started().await?;
    reg.push_image("private/a", "v1", &[("/hello", b"hello from private/a\n".to_vec())]).await?;
    let blobs = reg.image_blobs("private/a", "v1").await?;
    assert_eq!(blobs.len(), 3, "config, busybox layer, file layer: {blobs:?}");

    let manifest = format!("{}/v2/private/a/manifests/v1", reg.url());
    let resp = fetch(Method::GET, &manifest, ALICE).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(fetch(Method::GET, &manifest, Some(("bob", "bob-pw"))).await?.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fetch(Method::GET, &manifest, Some((ADMIN_USER, ADMIN_PASSWORD))).await?.status(), StatusCode::OK);
    Ok(())
}

/// The fixture as the access-model tests use it: a client pulls through the Shoal mirror with
/// `?ns=`, following the challenge the mirror relays from the registry.
#[tokio::test]
async fn a_granted_user_pulls_a_private_blob_through_the_mirror() -> anyhow::Result<()> {
    let reg = started().await?;
    let bytes = random_bytes(300_000, 4);
    let digest = reg.push_blob("private/a", &bytes).await?;
    let other = reg.push_blob("private/b", &random_bytes(1000, 5)).await?;
    let agent = Agent::start("").await?;

    let resp = fetch(Method::GET, &agent.blob_url(reg.registry(), "private/a", &digest), ALICE).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await?.as_ref(), &bytes[..]);
    assert_eq!(reg.blob_fetches(&digest).len(), 1);

    let refused = fetch(Method::GET, &agent.blob_url(reg.registry(), "private/b", &other), None).await?.status();
    assert_eq!(refused, StatusCode::UNAUTHORIZED);
    assert!(reg.blob_fetches(&other).is_empty());
    Ok(())
}
