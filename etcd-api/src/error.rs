//! The one table of etcd errors: internal error kinds, their gRPC codes and etcd's
//! exact messages. Clients parse these messages, so they must match etcd's byte for byte.
//! Imports nothing from the other layers.

use tonic::Code;

macro_rules! etcd_errors {
    ($($variant:ident = $num:expr, $code:ident, $message:expr;)*) => {
        /// An error that etcd reports to clients with a fixed gRPC code and message.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
        #[repr(u32)]
        pub enum EtcdError {
            $(
                #[error($message)]
                $variant = $num,
            )*
        }

        impl EtcdError {
            /// The gRPC status code etcd uses for this error.
            pub fn code(self) -> Code {
                match self { $(EtcdError::$variant => Code::$code,)* }
            }

            /// The number that carries this error inside a Raft response.
            pub fn number(self) -> u32 {
                self as u32
            }

            /// The error for a number from [`EtcdError::number`].
            pub fn from_number(number: u32) -> Option<EtcdError> {
                match number { $($num => Some(EtcdError::$variant),)* _ => None }
            }

            /// Every error in the table.
            pub const ALL: &'static [EtcdError] = &[$(EtcdError::$variant,)*];
        }
    };
}

etcd_errors! {
    EmptyKey = 1, InvalidArgument, "etcdserver: key is not provided";
    KeyNotFound = 2, InvalidArgument, "etcdserver: key not found";
    ValueProvided = 3, InvalidArgument, "etcdserver: value is provided";
    LeaseProvided = 4, InvalidArgument, "etcdserver: lease is provided";
    TooManyOps = 5, InvalidArgument, "etcdserver: too many operations in txn request";
    DuplicateKey = 6, InvalidArgument, "etcdserver: duplicate key given in txn request";
    InvalidSortOption = 7, InvalidArgument, "etcdserver: invalid sort option";
    Compacted = 8, OutOfRange, "etcdserver: mvcc: required revision has been compacted";
    FutureRev = 9, OutOfRange, "etcdserver: mvcc: required revision is a future revision";
    NoSpace = 10, ResourceExhausted, "etcdserver: mvcc: database space exceeded";
    LeaseNotFound = 11, NotFound, "etcdserver: requested lease not found";
    LeaseExist = 12, FailedPrecondition, "etcdserver: lease already exists";
    LeaseTtlTooLarge = 13, OutOfRange, "etcdserver: too large lease TTL";
    MemberExist = 14, FailedPrecondition, "etcdserver: member ID already exist";
    PeerUrlExist = 15, FailedPrecondition, "etcdserver: Peer URLs already exists";
    MemberNotEnoughStarted = 16, FailedPrecondition, "etcdserver: re-configuration failed due to not enough started members";
    MemberBadUrls = 17, InvalidArgument, "etcdserver: given member URLs are invalid";
    MemberNotFound = 18, NotFound, "etcdserver: member not found";
    MemberNotLearner = 19, FailedPrecondition, "etcdserver: can only promote a learner member";
    LearnerNotReady = 20, FailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader";
    TooManyLearners = 21, FailedPrecondition, "etcdserver: too many learner members in cluster";
    RequestTooLarge = 22, InvalidArgument, "etcdserver: request is too large";
    TooManyRequests = 23, ResourceExhausted, "etcdserver: too many requests";
    NoLeader = 24, Unavailable, "etcdserver: no leader";
    NotLeader = 25, FailedPrecondition, "etcdserver: not leader";
    LeaderChanged = 26, Unavailable, "etcdserver: leader changed";
    NotCapable = 27, Unavailable, "etcdserver: not capable";
    Stopped = 28, Unavailable, "etcdserver: server stopped";
    Timeout = 29, Unavailable, "etcdserver: request timed out";
    TimeoutDueToLeaderFail = 30, Unavailable, "etcdserver: request timed out, possibly due to previous leader failure";
    Unhealthy = 31, Unavailable, "etcdserver: unhealthy cluster";
    Corrupt = 32, DataLoss, "etcdserver: corrupt cluster";
    NotSupportedForLearner = 33, Unavailable, "etcdserver: rpc not supported for learner";
    BadLeaderTransferee = 34, FailedPrecondition, "etcdserver: bad leader transferee";
    // etcd returns this one as a plain error, which gRPC reports as Unknown.
    TimeoutLeaderTransfer = 35, Unknown, "etcdserver: request timed out, leader transfer took too long";
    RootUserNotExist = 36, FailedPrecondition, "etcdserver: root user does not exist";
    RootRoleNotExist = 37, FailedPrecondition, "etcdserver: root user does not have root role";
    UserAlreadyExist = 38, FailedPrecondition, "etcdserver: user name already exists";
    UserEmpty = 39, InvalidArgument, "etcdserver: user name is empty";
    UserNotFound = 40, FailedPrecondition, "etcdserver: user name not found";
    RoleAlreadyExist = 41, FailedPrecondition, "etcdserver: role name already exists";
    RoleNotFound = 42, FailedPrecondition, "etcdserver: role name not found";
    RoleEmpty = 43, InvalidArgument, "etcdserver: role name is empty";
    AuthFailed = 44, InvalidArgument, "etcdserver: authentication failed, invalid user ID or password";
    PermissionDenied = 45, PermissionDenied, "etcdserver: permission denied";
    RoleNotGranted = 46, FailedPrecondition, "etcdserver: role is not granted to the user";
    PermissionNotGranted = 47, FailedPrecondition, "etcdserver: permission is not granted to the role";
    AuthNotEnabled = 48, FailedPrecondition, "etcdserver: authentication is not enabled";
    InvalidAuthToken = 49, Unauthenticated, "etcdserver: invalid auth token";
    InvalidAuthMgmt = 50, InvalidArgument, "etcdserver: invalid auth management";
    AuthOldRevision = 51, InvalidArgument, "etcdserver: revision of auth store is old";
}

impl EtcdError {
    /// The etcd error a status carries: its code and message are exactly those of an
    /// entry of the table (as etcd's client decodes errors, by message).
    pub fn from_status(status: &tonic::Status) -> Option<EtcdError> {
        EtcdError::ALL
            .iter()
            .copied()
            .find(|error| error.code() == status.code() && error.to_string() == status.message())
    }

    /// The etcd error a peer answered with, by its message; a peer that cannot be
    /// reached counts as no leader.
    pub fn from_peer_status(status: &tonic::Status) -> Option<EtcdError> {
        EtcdError::ALL
            .iter()
            .copied()
            .find(|error| error.to_string() == status.message())
            .or((status.code() == Code::Unavailable).then_some(EtcdError::NoLeader))
    }
}

impl From<EtcdError> for tonic::Status {
    fn from(error: EtcdError) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for error in EtcdError::ALL {
            assert!(
                seen.insert(error.number()),
                "duplicate number for {error:?}"
            );
            assert_eq!(EtcdError::from_number(error.number()), Some(*error));
        }
        assert_eq!(EtcdError::from_number(0), None);
    }

    #[test]
    fn status_carries_etcd_code_and_message() {
        let status = tonic::Status::from(EtcdError::Compacted);
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let status = tonic::Status::from(EtcdError::EmptyKey);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "etcdserver: key is not provided");
    }

    #[test]
    fn statuses_decode_back_to_their_error() {
        for error in EtcdError::ALL {
            let status = tonic::Status::from(*error);
            assert_eq!(EtcdError::from_status(&status), Some(*error));
        }
        let other_code = tonic::Status::unavailable("etcdserver: key is not provided");
        assert_eq!(EtcdError::from_status(&other_code), None);
        assert_eq!(
            EtcdError::from_status(&tonic::Status::unavailable("connection refused")),
            None
        );
    }
}
