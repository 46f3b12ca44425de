//! A fleet of relays sharing state in Redis (`fleet-redis`): the nonce secret and per-user
//! quotas across nodes. Without `fleet-redis` (and `nonce-secret-file`) none of it runs and a
//! node behaves exactly as alone.

pub mod nonce_secret;
pub mod quota;
