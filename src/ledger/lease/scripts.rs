//! The shared ledger's Redis side: the Lua scripts, how they are sent, and the connection to
//! one server or a cluster.

use super::RedisSettings;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Grant, give back and report, in one atomic step per key and gateway (see the module doc).
/// KEYS: the key's hash (`committed`, `seeded`) and its lease records (gateway -> "granted
/// held valid_until_ms"); both carry the hash tag `{id}`, so they share one cluster slot.
/// ARGV[10]: when the counter ends (unix seconds; 0: never): both keys expire then. Not when
/// that is already past on Redis's clock (a gateway whose clock is far behind): expiring at
/// once would give the period's spending back. ARGV[11]: the `valid_until_ms` of this
/// gateway's record in the last answer that showed one (0: none), on Redis's clock. Returns
/// `{applied, granted, committed, consumption, valid_until_ms}` (the record's, after the call;
/// 0 when there is none). ARGV[12]: a give-back whose answer was lost (`pending`, held back by
/// the gateway).
pub(super) const SYNC_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gw, known, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local need, want = tonumber(ARGV[4]), tonumber(ARGV[5])
local give, deficit, held = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local expire = tonumber(ARGV[10])
local seen = tonumber(ARGV[11] or '0')
local pending = tonumber(ARGV[12] or '0')
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed') or '0')
-- No record. Removed for age (a day and an hour after it expired, below; the hour is a margin
-- for a Redis clock that steps back) while its gateway was away: its grants are in `committed`,
-- and the gateway is trusted. But a record the gateway saw valid until less than a day ago
-- cannot have been removed for age, nor one whose `committed` is below what the gateway was
-- granted (less a give-back whose answer it lost): it was lost with the writes that made it (a
-- failover before they reached the replica, a Redis that lost its data). Then nothing is
-- granted, and the gateway corrects itself: what it spent from a lost grant comes back as an
-- overdraft. Trusted, a give-back whose answer was lost is taken as applied: had it not been,
-- what it gave stays stranded (counted, never spent), rather than credited twice.
local granted, valid = known - pending, 0
local rec = redis.call('HGET', KEYS[2], gw)
if rec then
  local g, h, e = string.match(rec, '^(%S+) (%S+) (%S+)$')
  granted, valid = tonumber(g), tonumber(e)
elseif seen >= now - 86400000 or committed < known - pending then
  granted = 0
end
local applied, grant = 0, 0
if granted == known then
  applied = 1
  committed = committed - give + deficit
  granted = granted - give + deficit
  if want > 0 then
    grant = want
    if limit >= 0 then
      local room = limit - committed
      grant = math.max(0, math.min(want, math.max(need, math.floor(room / 8)), room))
    end
    committed = committed + grant
    granted = granted + grant
  end
  redis.call('HSET', KEYS[1], 'committed', string.format('%d', committed))
  -- Kept even when empty (removed for age like any other): a give-back of everything whose
  -- answer is lost then meets its record when sent again, and is not applied twice.
  valid = now + ttl
  local left = held + deficit + grant
  redis.call('HSET', KEYS[2], gw, string.format('%d %d %d', granted, left, valid))
end
local holding = 0
local records = redis.call('HGETALL', KEYS[2])
for i = 1, #records, 2 do
  local g, h, e = string.match(records[i + 1], '^(%S+) (%S+) (%S+)$')
  e = tonumber(e or '0')
  if e >= now then
    holding = holding + tonumber(h)
  elseif e < now - 90000000 then
    redis.call('HDEL', KEYS[2], records[i])
  end
end
if expire * 1000 > now then
  redis.call('EXPIREAT', KEYS[1], expire)
  redis.call('EXPIREAT', KEYS[2], expire)
end
return {applied, granted, committed, committed - holding, valid}
";

/// A key's consumption across all gateways (read only).
pub(super) const READ_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed') or '0')
local holding = 0
local records = redis.call('HGETALL', KEYS[2])
for i = 1, #records, 2 do
  local g, h, e = string.match(records[i + 1], '^(%S+) (%S+) (%S+)$')
  if tonumber(e or '0') >= now then holding = holding + tonumber(h) end
end
return committed - holding
";

/// Add what a gateway charged before it used Redis (its local ledger), once per key: the first
/// gateway to seed a key wins, so gateways starting together never double it. ARGV[2]: when
/// the counter ends (unix seconds; 0: never), as for the sync.
pub(super) const SEED_SCRIPT: &str = r"
if redis.call('HSETNX', KEYS[1], 'seeded', ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'committed', ARGV[1])
  local expire = tonumber(ARGV[2])
  if expire > tonumber(redis.call('TIME')[1]) then
    redis.call('EXPIREAT', KEYS[1], expire)
  end
  return 1
end
return 0
";

/// The key's two Redis keys; the `{id}` hash tag puts them in one cluster slot.
pub(super) fn redis_keys(key_id: u64) -> (String, String) {
    (
        format!("keygate:{{{key_id}}}"),
        format!("keygate:{{{key_id}}}:leases"),
    )
}

/// A Lua script: its text and SHA-1. Sent with `EVALSHA`, and with `EVAL` when the node does
/// not have it yet (`NOSCRIPT`), so on a cluster it is loaded only on the key's own node.
pub(super) struct Script {
    pub(super) code: &'static str,
    pub(super) sha: String,
}

impl Script {
    pub(super) fn new(code: &'static str) -> Script {
        Script {
            code,
            sha: redis::Script::new(code).get_hash().to_string(),
        }
    }

    pub(super) async fn call<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        keys: &[&str],
        args: &[i64],
        gateway: Option<&str>,
    ) -> redis::RedisResult<T> {
        let command = |name: &str, script: &str| {
            let mut c = redis::cmd(name);
            c.arg(script).arg(keys.len()).arg(keys);
            if let Some(g) = gateway {
                c.arg(g);
            }
            c.arg(args);
            c
        };
        match command("EVALSHA", &self.sha).query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                command("EVAL", self.code).query_async(conn).await
            }
            other => other,
        }
    }
}

pub(super) struct Scripts {
    pub(super) sync: Script,
    pub(super) read: Script,
    pub(super) seed: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            sync: Script::new(SYNC_SCRIPT),
            read: Script::new(READ_SCRIPT),
            seed: Script::new(SEED_SCRIPT),
        }
    }
}

/// Whether an error means Redis (or the key's node) cannot be reached, as opposed to a fault
/// of one call (a script error, a wrong type), which is refused for that key alone.
pub(super) fn unreachable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    !matches!(
        e.kind(),
        ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Server(S::ResponseError | S::ExecAbort | S::CrossSlot | S::NoPerm)
    )
}

/// A connection to one server (reconnecting by itself) or to a cluster (following redirects
/// and failovers by itself).
#[derive(Clone)]
pub(super) enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub(super) async fn connect(settings: &RedisSettings) -> redis::RedisResult<Conn> {
    if settings.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(settings.urls.clone())
            .connection_timeout(settings.timeout)
            .response_timeout(settings.timeout)
            .retries(1)
            .build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    } else {
        let client = redis::Client::open(settings.urls[0].as_str())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Conn::Single(
            redis::aio::ConnectionManager::new_with_config(client, config).await?,
        ))
    }
}

/// A worker's next round: every message waiting (at least one, or none when `until` comes
/// first); `None` once every sender is gone.
pub(super) async fn next_messages<M>(
    rx: &mut mpsc::UnboundedReceiver<M>,
    until: Instant,
) -> Option<Vec<M>> {
    let first = tokio::select! {
        m = rx.recv() => Some(m?),
        _ = tokio::time::sleep_until(until.into()) => None,
    };
    let mut msgs: Vec<M> = first.into_iter().collect();
    while let Ok(m) = rx.try_recv() {
        msgs.push(m);
    }
    Some(msgs)
}

/// One PING within `timeout`: whether Redis answers (why not, if not).
pub(super) async fn ping(conn: &mut Conn, timeout: Duration) -> Result<(), String> {
    let cmd = redis::cmd("PING");
    match tokio::time::timeout(timeout, cmd.query_async::<String>(conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("PING: {e}")),
        Err(_) => Err("PING timed out".into()),
    }
}
