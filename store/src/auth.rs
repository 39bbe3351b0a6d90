//! The auth store: users (passwords bcrypt-hashed), roles with key permissions, the
//! enabled flag and the auth revision, all part of the replicated state; and the
//! simple tokens handed out by Authenticate, kept in memory on every member.
//!
//! Permission checks follow etcd's rules: with auth enabled, a client request acts
//! for a user (named by a token or a client certificate's CommonName), the `root`
//! role may do anything, other users may touch a key or range only when the union
//! of their roles' permissions covers it. Checks run where the request takes
//! effect: in apply for everything that goes through Raft, so a permission revoked
//! between the check in the API layer and apply cannot be used.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::Message;

use crate::error::EtcdError;
use crate::mvcc::lease::LeaseTable;
use crate::pb::authpb::permission::Type as PermissionType;
use crate::pb::authpb::{Permission, Role, User, UserAddOptions};
use crate::pb::etcdserverpb::request_op::Request as Op;
use crate::pb::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, AuthUserGrantRoleRequest, AuthUserRevokeRoleRequest,
    DeleteRangeRequest, PutRequest, TxnRequest,
};
use crate::pb::kvstorepb::AuthInfo;

/// The user and the role that may do anything.
pub const ROOT: &str = "root";

/// What a request does to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads it.
    Read,
    /// Writes or deletes it.
    Write,
}

/// A simple token's owner and when it was last used; it lapses after the token TTL
/// without use.
struct Token {
    user: String,
    used: Instant,
}

/// The auth part of the replicated state, and the tokens of this member.
#[derive(Default)]
pub struct AuthState {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    tokens: Mutex<HashMap<String, Token>>,
}

/// A half-open key interval; `None` as its end means "to the end of the key space".
type Interval = (Vec<u8>, Option<Vec<u8>>);

/// The keys a request's `key` and `range_end` name, as etcd reads them: no end is
/// the one key, an end of `\0` is every key from `key` on.
fn interval(key: &[u8], range_end: &[u8]) -> Interval {
    match range_end {
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), Some(end))
        }
        [0] => (key.to_vec(), None),
        end => (key.to_vec(), Some(end.to_vec())),
    }
}

/// Whether the union of `granted` contains all of `wanted`.
fn covered(mut granted: Vec<Interval>, wanted: &Interval) -> bool {
    granted.sort();
    let mut merged: Vec<Interval> = Vec::new();
    for (start, end) in granted {
        if let Some(last) = merged.last_mut() {
            let touches = match &last.1 {
                None => true,
                Some(last_end) => start <= *last_end,
            };
            if touches {
                last.1 = match (&last.1, end) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => Some(a.clone().max(b)),
                };
                continue;
            }
        }
        merged.push((start, end));
    }
    merged.iter().any(|(start, end)| {
        *start <= wanted.0
            && match (end, &wanted.1) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(end), Some(wanted_end)) => wanted_end <= end,
            }
    })
}

fn grants(permission: &Permission, access: Access) -> bool {
    match PermissionType::try_from(permission.perm_type) {
        Ok(PermissionType::Readwrite) => true,
        Ok(PermissionType::Read) => access == Access::Read,
        Ok(PermissionType::Write) => access == Access::Write,
        Err(_) => false,
    }
}

impl AuthState {
    /// Loads the auth records of the meta column family (`records` without their
    /// prefix).
    pub fn load(records: Vec<(Vec<u8>, Vec<u8>)>) -> AuthState {
        let mut state = AuthState::default();
        for (key, value) in records {
            match key.as_slice() {
                b"enabled" => state.enabled = value == [1],
                b"revision" => {
                    state.revision = value.try_into().map(u64::from_be_bytes).unwrap_or(0)
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"user/") {
                        if let Ok(user) = User::decode(value.as_slice()) {
                            state
                                .users
                                .insert(String::from_utf8_lossy(name).into_owned(), user);
                        }
                    } else if let Some(name) = key.strip_prefix(b"role/") {
                        if let Ok(role) = Role::decode(value.as_slice()) {
                            state
                                .roles
                                .insert(String::from_utf8_lossy(name).into_owned(), role);
                        }
                    }
                }
            }
        }
        state
    }

    /// The records that store this state, without the prefix.
    pub fn records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut records = vec![
            (b"enabled".to_vec(), vec![u8::from(self.enabled)]),
            (b"revision".to_vec(), self.revision.to_be_bytes().to_vec()),
        ];
        for (name, user) in &self.users {
            records.push(([b"user/", name.as_bytes()].concat(), user.encode_to_vec()));
        }
        for (name, role) in &self.roles {
            records.push(([b"role/", name.as_bytes()].concat(), role.encode_to_vec()));
        }
        records
    }

    /// Whether authentication is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision: it grows with every change of users, roles or the flag.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A user, with its hashed password.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// A role.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// All user names, in order.
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// All role names, in order.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    fn is_root(&self, user: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|user| user.roles.iter().any(|role| role == ROOT))
    }

    /// Whether `user` has been granted `role`.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|user| user.roles.iter().any(|granted| granted == role))
    }

    /// Whether `auth` may do `access` on `key`..`range_end`. `None` is the server's
    /// own request, which may do anything.
    pub fn check(
        &self,
        auth: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), EtcdError> {
        let (true, Some(auth)) = (self.enabled, auth) else {
            return Ok(());
        };
        if auth.revision == 0 {
            return Err(EtcdError::UserEmpty);
        }
        if auth.revision < self.revision {
            return Err(EtcdError::AuthOldRevision);
        }
        let Some(user) = self.users.get(&auth.username) else {
            return Err(EtcdError::PermissionDenied);
        };
        if user.roles.iter().any(|role| role == ROOT) {
            return Ok(());
        }
        let granted = user
            .roles
            .iter()
            .filter_map(|role| self.roles.get(role))
            .flat_map(|role| &role.key_permission)
            .filter(|permission| grants(permission, access))
            .map(|permission| interval(&permission.key, &permission.range_end))
            .collect();
        if covered(granted, &interval(key, range_end)) {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// Whether `auth` may administer the cluster (the `root` role).
    pub fn check_admin(&self, auth: Option<&AuthInfo>) -> Result<(), EtcdError> {
        let (true, Some(auth)) = (self.enabled, auth) else {
            return Ok(());
        };
        if auth.username.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        if !self.users.contains_key(&auth.username) {
            return Err(EtcdError::UserNotFound);
        }
        if !self.is_root(&auth.username) {
            return Err(EtcdError::PermissionDenied);
        }
        Ok(())
    }

    /// Checks every part of a transaction: compares need read, puts write (and read
    /// with `prev_kv`), deletes write (and read with `prev_kv`), ranges read, nested
    /// transactions the same, all the way down; a put with a lease needs write on
    /// every key already attached to that lease.
    pub fn check_txn(
        &self,
        auth: Option<&AuthInfo>,
        txn: &TxnRequest,
        leases: &LeaseTable,
    ) -> Result<(), EtcdError> {
        if !self.enabled {
            return Ok(());
        }
        for compare in &txn.compare {
            self.check(auth, &compare.key, &compare.range_end, Access::Read)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(Op::RequestRange(range)) => {
                    self.check(auth, &range.key, &range.range_end, Access::Read)?
                }
                Some(Op::RequestPut(put)) => self.check_put(auth, put, leases)?,
                Some(Op::RequestDeleteRange(delete)) => self.check_delete(auth, delete)?,
                Some(Op::RequestTxn(nested)) => self.check_txn(auth, nested, leases)?,
                None => {}
            }
        }
        Ok(())
    }

    /// A put needs write on its key, read too with `prev_kv`, and write on every key
    /// already attached to its lease.
    pub fn check_put(
        &self,
        auth: Option<&AuthInfo>,
        put: &PutRequest,
        leases: &LeaseTable,
    ) -> Result<(), EtcdError> {
        self.check(auth, &put.key, &[], Access::Write)?;
        if put.prev_kv {
            self.check(auth, &put.key, &[], Access::Read)?;
        }
        self.check_lease_keys(auth, put.lease, leases)
    }

    /// A delete needs write on its range, read too with `prev_kv`.
    pub fn check_delete(
        &self,
        auth: Option<&AuthInfo>,
        delete: &DeleteRangeRequest,
    ) -> Result<(), EtcdError> {
        self.check(auth, &delete.key, &delete.range_end, Access::Write)?;
        if delete.prev_kv {
            self.check(auth, &delete.key, &delete.range_end, Access::Read)?;
        }
        Ok(())
    }

    /// Write permission on every key attached to `lease` (a put that attaches to it,
    /// or its revocation, could otherwise delete keys the user may not touch).
    pub fn check_lease_keys(
        &self,
        auth: Option<&AuthInfo>,
        lease: i64,
        leases: &LeaseTable,
    ) -> Result<(), EtcdError> {
        if !self.enabled || lease == 0 {
            return Ok(());
        }
        if let Some(record) = leases.get(lease) {
            for key in &record.keys {
                self.check(auth, key, &[], Access::Write)?;
            }
        }
        Ok(())
    }

    fn changed(&mut self) {
        self.revision += 1;
    }

    /// AuthEnable: needs the root user with the root role.
    pub fn enable(&mut self) -> Result<(), EtcdError> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(EtcdError::RootUserNotExist)?;
        if !root.roles.iter().any(|role| role == ROOT) {
            return Err(EtcdError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    /// AuthDisable: every token lapses.
    pub fn disable(&mut self) {
        if self.enabled {
            self.enabled = false;
            self.changed();
            self.tokens.lock().clear();
        }
    }

    /// UserAdd, with the password already hashed (`hashed_password`).
    pub fn user_add(&mut self, request: &AuthUserAddRequest) -> Result<(), EtcdError> {
        if request.name.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        if self.users.contains_key(&request.name) {
            return Err(EtcdError::UserAlreadyExist);
        }
        let options = request
            .options
            .unwrap_or(UserAddOptions { no_password: false });
        self.users.insert(
            request.name.clone(),
            User {
                name: request.name.as_bytes().to_vec(),
                password: if options.no_password {
                    Vec::new()
                } else {
                    request.hashed_password.as_bytes().to_vec()
                },
                roles: Vec::new(),
                options: Some(options),
            },
        );
        self.changed();
        Ok(())
    }

    /// UserDelete: the root user stays while auth is enabled.
    pub fn user_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(EtcdError::UserNotFound)?;
        self.changed();
        self.invalidate_tokens(name);
        Ok(())
    }

    /// UserChangePassword, with the new password already hashed.
    pub fn user_change_password(
        &mut self,
        request: &AuthUserChangePasswordRequest,
    ) -> Result<(), EtcdError> {
        let user = self
            .users
            .get_mut(&request.name)
            .ok_or(EtcdError::UserNotFound)?;
        user.password = request.hashed_password.as_bytes().to_vec();
        self.changed();
        self.invalidate_tokens(&request.name);
        Ok(())
    }

    /// UserGrantRole: the role must exist, except `root`.
    pub fn user_grant_role(&mut self, request: &AuthUserGrantRoleRequest) -> Result<(), EtcdError> {
        if !self.users.contains_key(&request.user) {
            return Err(EtcdError::UserNotFound);
        }
        if request.role != ROOT && !self.roles.contains_key(&request.role) {
            return Err(EtcdError::RoleNotFound);
        }
        let user = self.users.get_mut(&request.user).expect("checked above");
        if user.roles.contains(&request.role) {
            return Ok(());
        }
        user.roles.push(request.role.clone());
        user.roles.sort();
        self.changed();
        Ok(())
    }

    /// UserRevokeRole: root keeps the root role while auth is enabled.
    pub fn user_revoke_role(
        &mut self,
        request: &AuthUserRevokeRoleRequest,
    ) -> Result<(), EtcdError> {
        if self.enabled && request.name == ROOT && request.role == ROOT {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        let user = self
            .users
            .get_mut(&request.name)
            .ok_or(EtcdError::UserNotFound)?;
        let before = user.roles.len();
        user.roles.retain(|role| *role != request.role);
        if user.roles.len() == before {
            return Err(EtcdError::RoleNotGranted);
        }
        self.changed();
        Ok(())
    }

    /// RoleAdd.
    pub fn role_add(&mut self, name: &str) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(EtcdError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(EtcdError::RoleAlreadyExist);
        }
        self.roles.insert(
            name.to_string(),
            Role {
                name: name.as_bytes().to_vec(),
                key_permission: Vec::new(),
            },
        );
        self.changed();
        Ok(())
    }

    /// RoleDelete: the role is also taken from every user; the root role stays
    /// while auth is enabled.
    pub fn role_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(EtcdError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.retain(|role| role != name);
        }
        self.changed();
        Ok(())
    }

    /// RoleGrantPermission: a permission on the same key and range end is replaced.
    pub fn role_grant_permission(
        &mut self,
        request: &AuthRoleGrantPermissionRequest,
    ) -> Result<(), EtcdError> {
        let role = self
            .roles
            .get_mut(&request.name)
            .ok_or(EtcdError::RoleNotFound)?;
        let permission = request.perm.clone().unwrap_or_default();
        match role
            .key_permission
            .iter_mut()
            .find(|p| p.key == permission.key && p.range_end == permission.range_end)
        {
            Some(existing) => existing.perm_type = permission.perm_type,
            None => {
                role.key_permission.push(permission);
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        self.changed();
        Ok(())
    }

    /// RoleRevokePermission.
    pub fn role_revoke_permission(
        &mut self,
        request: &AuthRoleRevokePermissionRequest,
    ) -> Result<(), EtcdError> {
        let role = self
            .roles
            .get_mut(&request.role)
            .ok_or(EtcdError::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| !(p.key == request.key && p.range_end == request.range_end));
        if role.key_permission.len() == before {
            return Err(EtcdError::PermissionNotGranted);
        }
        self.changed();
        Ok(())
    }

    /// Makes `token` valid for `user` (applied Authenticate). Tokens unused for
    /// `ttl` are dropped meanwhile.
    pub fn add_token(&self, token: &str, user: &str, ttl: Duration) {
        let mut tokens = self.tokens.lock();
        let now = Instant::now();
        tokens.retain(|_, token| now.duration_since(token.used) < ttl);
        tokens.insert(
            token.to_string(),
            Token {
                user: user.to_string(),
                used: now,
            },
        );
    }

    /// The user a simple token names, if it was used within `ttl`; using it
    /// extends it.
    pub fn token_user(&self, token: &str, ttl: Duration) -> Option<String> {
        let mut tokens = self.tokens.lock();
        let entry = tokens.get_mut(token)?;
        let now = Instant::now();
        if now.duration_since(entry.used) >= ttl {
            tokens.remove(token);
            return None;
        }
        entry.used = now;
        Some(entry.user.clone())
    }

    fn invalidate_tokens(&self, user: &str) {
        self.tokens.lock().retain(|_, token| token.user != user);
    }
}

/// A new simple token: 16 random letters, a dot and a sequence number, as etcd's.
pub fn new_simple_token() -> String {
    use rand::Rng;
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut rng = rand::thread_rng();
    let letters: String = (0..16)
        .map(|_| {
            let n = rng.gen_range(0..52u8);
            char::from(if n < 26 { b'a' + n } else { b'A' + n - 26 })
        })
        .collect();
    let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{letters}.{sequence}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permission(kind: PermissionType, key: &[u8], range_end: &[u8]) -> Permission {
        Permission {
            perm_type: kind as i32,
            key: key.to_vec(),
            range_end: range_end.to_vec(),
        }
    }

    fn state_with(permissions: Vec<Permission>) -> (AuthState, AuthInfo) {
        let mut state = AuthState::default();
        for name in [ROOT, "alice"] {
            state
                .user_add(&AuthUserAddRequest {
                    name: name.into(),
                    hashed_password: "x".into(),
                    ..Default::default()
                })
                .unwrap();
        }
        state
            .user_grant_role(&AuthUserGrantRoleRequest {
                user: ROOT.into(),
                role: ROOT.into(),
            })
            .unwrap();
        state.role_add("r").unwrap();
        for perm in permissions {
            state
                .role_grant_permission(&AuthRoleGrantPermissionRequest {
                    name: "r".into(),
                    perm: Some(perm),
                })
                .unwrap();
        }
        state
            .user_grant_role(&AuthUserGrantRoleRequest {
                user: "alice".into(),
                role: "r".into(),
            })
            .unwrap();
        state.enable().unwrap();
        let auth = AuthInfo {
            username: "alice".into(),
            revision: state.revision(),
        };
        (state, auth)
    }

    #[test]
    fn ranges_must_be_covered_by_the_union_of_grants() {
        let (state, alice) = state_with(vec![
            permission(PermissionType::Readwrite, b"a", b"c"),
            permission(PermissionType::Read, b"c", b"e"),
            permission(PermissionType::Write, b"k", b""),
        ]);
        let ok = |key: &[u8], end: &[u8], access| state.check(Some(&alice), key, end, access);
        assert_eq!(ok(b"a", b"", Access::Write), Ok(()));
        assert_eq!(ok(b"b", b"e", Access::Read), Ok(()));
        assert_eq!(
            ok(b"b", b"e", Access::Write),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            ok(b"b", b"f", Access::Read),
            Err(EtcdError::PermissionDenied)
        );
        // From-key ranges reach the end of the key space: never covered by a range.
        assert_eq!(
            ok(b"a", b"\0", Access::Read),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(ok(b"k", b"", Access::Write), Ok(()));
        assert_eq!(
            ok(b"k", b"", Access::Read),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            ok(b"k\0", b"", Access::Write),
            Err(EtcdError::PermissionDenied)
        );
        let root = AuthInfo {
            username: ROOT.into(),
            revision: state.revision(),
        };
        assert_eq!(state.check(Some(&root), b"z", b"\0", Access::Write), Ok(()));
        let anonymous = AuthInfo::default();
        assert_eq!(
            state.check(Some(&anonymous), b"a", b"", Access::Read),
            Err(EtcdError::UserEmpty)
        );
        let stale = AuthInfo {
            revision: state.revision() - 1,
            ..alice.clone()
        };
        assert_eq!(
            state.check(Some(&stale), b"a", b"", Access::Read),
            Err(EtcdError::AuthOldRevision)
        );
        assert_eq!(
            state.check_admin(Some(&alice)),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(state.check_admin(Some(&root)), Ok(()));
    }

    #[test]
    fn nested_transactions_are_checked_all_the_way_down() {
        use crate::pb::etcdserverpb::{PutRequest, RangeRequest, RequestOp};
        let (state, alice) = state_with(vec![permission(PermissionType::Readwrite, b"a", b"")]);
        let put = |key: &[u8], prev_kv| RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: key.to_vec(),
                prev_kv,
                ..Default::default()
            })),
        };
        let nested = TxnRequest {
            success: vec![put(b"secret", false)],
            ..Default::default()
        };
        let txn = TxnRequest {
            success: vec![
                put(b"a", true),
                RequestOp {
                    request: Some(Op::RequestTxn(nested)),
                },
            ],
            ..Default::default()
        };
        let leases = LeaseTable::default();
        assert_eq!(
            state.check_txn(Some(&alice), &txn, &leases),
            Err(EtcdError::PermissionDenied)
        );
        let reading = TxnRequest {
            failure: vec![RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert_eq!(state.check_txn(Some(&alice), &reading, &leases), Ok(()));
    }

    #[test]
    fn records_round_trip() {
        let (state, _) = state_with(vec![permission(PermissionType::Read, b"x", b"y")]);
        let loaded = AuthState::load(state.records());
        assert!(loaded.enabled());
        assert_eq!(loaded.revision(), state.revision());
        assert_eq!(loaded.user_names(), vec!["alice", "root"]);
        assert_eq!(loaded.role("r"), state.role("r"));
    }
}
