//! Who may call what on the scheduler API. A bearer token names a role (agent, seed, preheat);
//! each method names the roles allowed to call it; a host the cluster knows as a seed may only
//! be acted for by a caller holding the seed role. Plain functions of their inputs: the service
//! asks [`Access::admit`] before any handler runs, and [`Caller::may_act_for`] where a request
//! names a host.

use std::fmt;

use shoal_core::bearer::BearerToken;

/// The gRPC service whose methods [`Method::from_path`] knows.
const SERVICE_PATH: &str = "/shoal.scheduler.v1.Scheduler/";

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A node agent: announces itself (not as a seed), downloads peer to peer, takes preheat
    /// work, shares access traces.
    Agent,
    /// A seed: everything an agent may, and announcing itself as a seed, which is what makes
    /// the scheduler send it the origins (and children's credentials) of the tasks it fetches.
    Seed,
    /// A preheat caller (`shoal preheat`): starts and follows preheat jobs, reads task stats.
    Preheat,
}

impl Role {
    /// The role's name, as refusals and logs say it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Seed => "seed",
            Role::Preheat => "preheat",
        }
    }

    /// The `[scheduler]` field naming the file that holds this role's token.
    pub fn token_field(self) -> &'static str {
        match self {
            Role::Agent => "agent_token_file",
            Role::Seed => "seed_token_file",
            Role::Preheat => "preheat_token_file",
        }
    }

    /// Where a caller of this role is given its token, for refusals to say.
    fn client_setting(self) -> &'static str {
        match self {
            Role::Agent | Role::Seed => "[peer] scheduler_token_file",
            Role::Preheat => "shoal preheat --token-file",
        }
    }
}

/// The methods of the scheduler API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    AnnounceHost,
    LeaveHost,
    AnnouncePeer,
    StatTask,
    Preheat,
    JobStatus,
    WatchJobs,
    ReportJob,
    GetManifest,
    ReportTrace,
    GetTrace,
    WantPieces,
    ReportPieces,
}

impl Method {
    /// Every method, in `scheduler.proto`'s order.
    pub const ALL: [Method; 13] = [
        Method::AnnounceHost,
        Method::LeaveHost,
        Method::AnnouncePeer,
        Method::StatTask,
        Method::Preheat,
        Method::JobStatus,
        Method::WatchJobs,
        Method::ReportJob,
        Method::GetManifest,
        Method::ReportTrace,
        Method::GetTrace,
        Method::WantPieces,
        Method::ReportPieces,
    ];

    /// Its name in `scheduler.proto`.
    pub fn name(self) -> &'static str {
        match self {
            Method::AnnounceHost => "AnnounceHost",
            Method::LeaveHost => "LeaveHost",
            Method::AnnouncePeer => "AnnouncePeer",
            Method::StatTask => "StatTask",
            Method::Preheat => "Preheat",
            Method::JobStatus => "JobStatus",
            Method::WatchJobs => "WatchJobs",
            Method::ReportJob => "ReportJob",
            Method::GetManifest => "GetManifest",
            Method::ReportTrace => "ReportTrace",
            Method::GetTrace => "GetTrace",
            Method::WantPieces => "WantPieces",
            Method::ReportPieces => "ReportPieces",
        }
    }

    /// The method a gRPC request path (`/shoal.scheduler.v1.Scheduler/Preheat`) calls.
    pub fn from_path(path: &str) -> Option<Method> {
        let name = path.strip_prefix(SERVICE_PATH)?;
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The roles allowed to call it. Hosts' methods are the agent's and the seed's; announcing
    /// a seed needs more, which [`Caller::may_announce`] checks on the request itself.
    pub fn roles(self) -> &'static [Role] {
        const HOSTS: &[Role] = &[Role::Agent, Role::Seed];
        match self {
            Method::AnnounceHost
            | Method::LeaveHost
            | Method::AnnouncePeer
            | Method::WatchJobs
            | Method::ReportJob
            | Method::GetManifest
            | Method::ReportTrace
            | Method::GetTrace
            | Method::WantPieces
            | Method::ReportPieces => HOSTS,
            Method::StatTask => &[Role::Agent, Role::Seed, Role::Preheat],
            Method::Preheat | Method::JobStatus => &[Role::Preheat],
        }
    }
}

/// Who a request comes from, as far as its token proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The API is open (no token configured): anyone, with every right.
    Anyone,
    /// A caller holding this role's token.
    Role(Role),
}

impl Caller {
    fn may_seed(self) -> bool {
        matches!(self, Caller::Anyone | Caller::Role(Role::Seed))
    }

    fn role_name(self) -> &'static str {
        match self {
            Caller::Anyone => "any",
            Caller::Role(r) => r.name(),
        }
    }

    /// Whether this caller may announce host `host` with `seed` set so, the host being known
    /// as a seed already or not.
    pub fn may_announce(self, host: &str, seed: bool, known_seed: bool) -> Result<(), Refusal> {
        if seed && !self.may_seed() {
            return Err(Refusal::NotSeed { host: host.into(), holds: self.role_name() });
        }
        self.may_act_for(host, known_seed)
    }

    /// Whether this caller may act for host `host` (announce it, take it away, take its
    /// preheat work, register its downloads): a host known as a seed only by a seed, so that
    /// an agent can neither demote a seed nor take its place.
    pub fn may_act_for(self, host: &str, known_seed: bool) -> Result<(), Refusal> {
        if known_seed && !self.may_seed() {
            return Err(Refusal::ActsForSeed { host: host.into(), holds: self.role_name() });
        }
        Ok(())
    }
}

/// Why a call is refused. [`Refusal::unauthenticated`] tells the two gRPC codes apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` header, or not a bearer one.
    NoToken,
    /// A bearer token that is none of the configured ones.
    UnknownToken,
    /// A known token whose role may not call the method.
    NotAllowed { method: &'static str, holds: Role, needs: &'static [Role] },
    /// A method that has no rule here (a newer client, or a path outside the API).
    UnknownMethod { path: String },
    /// Announcing a seed without the seed role.
    NotSeed { host: String, holds: &'static str },
    /// Acting for a host known as a seed without the seed role.
    ActsForSeed { host: String, holds: &'static str },
}

impl Refusal {
    /// Whether the caller proved no identity (gRPC `Unauthenticated`); otherwise it proved one
    /// without the right (`PermissionDenied`).
    pub fn unauthenticated(&self) -> bool {
        matches!(self, Refusal::NoToken | Refusal::UnknownToken)
    }
}

fn role_list(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(" or ")
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoToken => write!(
                f,
                "this scheduler needs a bearer token (`authorization: Bearer <token>`): set [peer] scheduler_token_file on hosts, \
                 or pass shoal preheat --token-file, to a file holding the token of the scheduler's [scheduler] \
                 agent_token_file, seed_token_file or preheat_token_file"
            ),
            Refusal::UnknownToken => write!(
                f,
                "the bearer token is none of this scheduler's: compare the caller's token file with the scheduler's \
                 [scheduler] agent_token_file, seed_token_file and preheat_token_file"
            ),
            Refusal::NotAllowed { method, holds, needs } => {
                let first = needs.first().copied().unwrap_or(Role::Agent);
                write!(
                    f,
                    "{method} needs the {} token, and this caller holds the {} token (give {} the token of the \
                     scheduler's [scheduler] {})",
                    role_list(needs),
                    holds.name(),
                    first.client_setting(),
                    first.token_field()
                )
            }
            Refusal::UnknownMethod { path } => write!(f, "{path} has no access rule on this scheduler (is the caller newer than it?)"),
            Refusal::NotSeed { host, holds } => write!(
                f,
                "announcing host {host} as a seed needs the seed token, and this caller holds the {holds} token (give seeds \
                 the token of the scheduler's [scheduler] seed_token_file as [peer] scheduler_token_file)"
            ),
            Refusal::ActsForSeed { host, holds } => write!(
                f,
                "host {host} is a seed: only a caller holding the seed token may act for it, and this caller holds the \
                 {holds} token (is another host configured with the same [peer] host_id?)"
            ),
        }
    }
}

/// Why a set of tokens cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[scheduler] {first} and {second} hold the same token: give each role its own")]
pub struct SharedToken {
    first: &'static str,
    second: &'static str,
}

/// The tokens a scheduler accepts, and the role each grants.
#[derive(Clone, Default)]
pub struct Access {
    /// blake3 of each token, whose comparison runs in constant time, so neither the tokens nor
    /// how much of one a caller guessed right show in how long an answer takes.
    tokens: Vec<(blake3::Hash, Role)>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access").field("roles", &self.roles()).finish()
    }
}

impl Access {
    /// An open API: every caller may do anything. Only for a scheduler nobody else reaches.
    pub fn open() -> Access {
        Access::default()
    }

    /// Access by these tokens; an empty list is an open API.
    pub fn new(tokens: impl IntoIterator<Item = (Role, BearerToken)>) -> Result<Access, SharedToken> {
        let mut access = Access::default();
        for (role, token) in tokens {
            let hash = blake3::hash(token.secret().as_bytes());
            if let Some((_, other)) = access.tokens.iter().find(|(h, _)| *h == hash) {
                return Err(SharedToken { first: other.token_field(), second: role.token_field() });
            }
            access.tokens.push((hash, role));
        }
        Ok(access)
    }

    /// Whether every caller may do anything.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The roles that have a token.
    pub fn roles(&self) -> Vec<Role> {
        self.tokens.iter().map(|(_, r)| *r).collect()
    }

    /// Who the `authorization` header value (if any) proves the caller is.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, Refusal> {
        if self.is_open() {
            return Ok(Caller::Anyone);
        }
        let token = authorization.and_then(bearer).ok_or(Refusal::NoToken)?;
        let presented = blake3::hash(token);
        // Every token is compared, so the time taken does not tell which one matched first.
        let mut found = None;
        for (hash, role) in &self.tokens {
            if *hash == presented {
                found = Some(*role);
            }
        }
        found.map(Caller::Role).ok_or(Refusal::UnknownToken)
    }

    /// Whether a call of the gRPC method at `path` with this `authorization` header may go
    /// ahead, and who made it.
    pub fn admit(&self, path: &str, authorization: Option<&[u8]>) -> Result<Caller, Refusal> {
        let caller = self.authenticate(authorization)?;
        let Caller::Role(role) = caller else { return Ok(caller) };
        let method = Method::from_path(path).ok_or_else(|| Refusal::UnknownMethod { path: path.into() })?;
        if !method.roles().contains(&role) {
            return Err(Refusal::NotAllowed { method: method.name(), holds: role, needs: method.roles() });
        }
        Ok(caller)
    }
}

/// The token of a `Bearer <token>` header value (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "agent-token-0123456789";
    const SEED: &str = "seed-token-0123456789";
    const PREHEAT: &str = "preheat-token-0123456789";

    fn access() -> Access {
        Access::new([(Role::Agent, AGENT), (Role::Seed, SEED), (Role::Preheat, PREHEAT)].map(|(r, t)| (r, BearerToken::parse(t).unwrap())))
            .unwrap()
    }

    fn header(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    fn path(m: Method) -> String {
        format!("{SERVICE_PATH}{}", m.name())
    }

    #[test]
    fn every_method_of_the_proto_has_an_access_rule() {
        let proto = include_str!("../../proto/proto/scheduler.proto");
        let names: Vec<&str> =
            proto.lines().filter_map(|l| l.trim().strip_prefix("rpc ")).map(|l| l.split('(').next().unwrap_or_default().trim()).collect();
        assert_eq!(names.len(), Method::ALL.len(), "a method was added to or removed from scheduler.proto: give it a rule");
        for name in names {
            let m = Method::from_path(&format!("{SERVICE_PATH}{name}")).unwrap_or_else(|| panic!("{name} has no access rule"));
            assert_eq!(m.name(), name);
        }
    }

    #[test]
    fn without_tokens_anyone_may_call_anything_and_announce_seeds() {
        let open = Access::open();
        assert!(open.is_open());
        for m in Method::ALL {
            assert_eq!(open.admit(&path(m), None), Ok(Caller::Anyone));
        }
        assert_eq!(open.admit("/other.Service/Method", None), Ok(Caller::Anyone));
        assert_eq!(Caller::Anyone.may_announce("h", true, true), Ok(()));
    }

    #[test]
    fn with_tokens_a_call_without_a_valid_bearer_token_is_unauthenticated() {
        let a = access();
        for m in Method::ALL {
            for bad in [None, Some(b"".as_slice()), Some(b"Basic dXNlcjpwYXNz"), Some(b"Bearer "), Some(b"Bearer not-a-token-at-all")] {
                let refusal = a.admit(&path(m), bad).unwrap_err();
                assert!(refusal.unauthenticated(), "{m:?} with {bad:?}: {refusal:?}");
            }
        }
        assert_eq!(a.authenticate(None), Err(Refusal::NoToken));
        assert_eq!(a.authenticate(Some(&header("x-agent-token-0123456789"))), Err(Refusal::UnknownToken));
        // A prefix or an extension of a real token is no token.
        assert_eq!(a.authenticate(Some(&header(&AGENT[..AGENT.len() - 1]))), Err(Refusal::UnknownToken));
        assert_eq!(a.authenticate(Some(&header(&format!("{AGENT}0")))), Err(Refusal::UnknownToken));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_surrounding_spaces_are_ignored() {
        let a = access();
        for h in [format!("Bearer {AGENT}"), format!("bearer {AGENT}"), format!("BEARER  {AGENT} ")] {
            assert_eq!(a.authenticate(Some(h.as_bytes())), Ok(Caller::Role(Role::Agent)), "{h}");
        }
        assert_eq!(a.authenticate(Some(AGENT.as_bytes())), Err(Refusal::NoToken), "a token without its scheme");
    }

    #[test]
    fn each_token_grants_its_role_s_methods_and_no_others() {
        let a = access();
        let allowed =
            |token: &str| -> Vec<Method> { Method::ALL.into_iter().filter(|m| a.admit(&path(*m), Some(&header(token))).is_ok()).collect() };
        use Method::*;
        let hosts = vec![
            AnnounceHost,
            LeaveHost,
            AnnouncePeer,
            StatTask,
            WatchJobs,
            ReportJob,
            GetManifest,
            ReportTrace,
            GetTrace,
            WantPieces,
            ReportPieces,
        ];
        assert_eq!(allowed(AGENT), hosts);
        assert_eq!(allowed(SEED), hosts);
        assert_eq!(allowed(PREHEAT), vec![StatTask, Preheat, JobStatus]);
    }

    #[test]
    fn a_refused_role_is_told_which_token_it_needs_and_where_it_is_configured() {
        let a = access();
        let refusal = a.admit(&path(Method::Preheat), Some(&header(AGENT))).unwrap_err();
        assert!(!refusal.unauthenticated());
        let text = refusal.to_string();
        assert!(text.contains("Preheat needs the preheat token") && text.contains("holds the agent token"), "{text}");
        assert!(text.contains("preheat_token_file") && text.contains("--token-file"), "{text}");
        let text = a.admit(&path(Method::AnnouncePeer), Some(&header(PREHEAT))).unwrap_err().to_string();
        assert!(text.contains("needs the agent or seed token") && text.contains("[peer] scheduler_token_file"), "{text}");
        let text = a.admit(&path(Method::AnnounceHost), None).unwrap_err().to_string();
        assert!(text.contains("scheduler_token_file") && text.contains("--token-file"), "{text}");
    }

    #[test]
    fn a_method_without_a_rule_is_refused_to_every_role() {
        let a = access();
        for token in [AGENT, SEED, PREHEAT] {
            let refusal = a.admit("/shoal.scheduler.v1.Scheduler/DropEverything", Some(&header(token))).unwrap_err();
            assert!(matches!(refusal, Refusal::UnknownMethod { .. }), "{refusal:?}");
        }
    }

    #[test]
    fn only_the_seed_role_announces_seeds_or_acts_for_a_known_seed() {
        let agent = Caller::Role(Role::Agent);
        let seed = Caller::Role(Role::Seed);
        assert_eq!(agent.may_announce("node-1", false, false), Ok(()));
        let refusal = agent.may_announce("fake", true, false).unwrap_err();
        assert!(!refusal.unauthenticated());
        assert!(refusal.to_string().contains("as a seed needs the seed token"), "{refusal}");
        // An agent re-announcing a seed's id would demote it, or put its own address in its place.
        assert!(matches!(agent.may_announce("seed-1", false, true), Err(Refusal::ActsForSeed { .. })));
        assert!(matches!(agent.may_act_for("seed-1", true), Err(Refusal::ActsForSeed { .. })));
        assert_eq!(agent.may_act_for("node-2", false), Ok(()));
        assert_eq!(seed.may_announce("seed-1", true, true), Ok(()));
        assert_eq!(seed.may_announce("seed-2", true, false), Ok(()));
        assert_eq!(seed.may_act_for("seed-1", true), Ok(()));
    }

    #[test]
    fn two_roles_may_not_share_a_token() {
        let t = BearerToken::parse(AGENT).unwrap();
        let e = Access::new([(Role::Agent, t.clone()), (Role::Seed, t)]).unwrap_err();
        assert_eq!(e.to_string(), "[scheduler] agent_token_file and seed_token_file hold the same token: give each role its own");
    }

    #[test]
    fn a_partial_set_of_tokens_still_closes_the_api() {
        let only_preheat = Access::new([(Role::Preheat, BearerToken::parse(PREHEAT).unwrap())]).unwrap();
        assert!(!only_preheat.is_open());
        assert_eq!(only_preheat.admit(&path(Method::AnnounceHost), None), Err(Refusal::NoToken));
        assert!(only_preheat.admit(&path(Method::Preheat), Some(&header(PREHEAT))).is_ok());
    }

    #[test]
    fn the_tokens_never_show_in_debug_output() {
        let text = format!("{:?}", access());
        assert!(!text.contains("token-0123456789"), "{text}");
        assert!(text.contains("Agent") && text.contains("Preheat"), "{text}");
    }
}
