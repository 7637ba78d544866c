//! The Redis counter store's connection handling.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use std::collections::{BTreeMap, HashSet};

use super::metrics::REDIS_COMMANDS_TOTAL;
use super::{CohortKey, Window, WindowStart};
use super::{CohortUpdate, CounterError, CounterWriter, Retention, WindowCounts, keys};
use crate::config::RedisUrl;

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL was rejected by the client.
    #[error("invalid redis url: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Command(#[from] redis::RedisError),
}

impl RedisError {
    /// Returns whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, RedisError::InvalidUrl(_))
    }
}

/// A lazily connected, self-reconnecting Redis connection.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    timeout: Duration,
    retention: Retention,
    connection: std::sync::Arc<OnceCell<ConnectionManager>>,
}

impl RedisStore {
    /// Prepares a connection to `url`; nothing is sent until first use.
    pub fn open(
        url: &RedisUrl,
        timeout: Duration,
        retention: Retention,
    ) -> Result<Self, RedisError> {
        let client = redis::Client::open(url.expose()).map_err(RedisError::InvalidUrl)?;
        Ok(Self {
            client,
            timeout,
            retention,
            connection: Default::default(),
        })
    }

    /// Returns a writer with its own blocking connection, for one pipeline worker thread.
    pub fn writer(&self) -> RedisWriter {
        RedisWriter {
            client: self.client.clone(),
            timeout: self.timeout,
            retention: self.retention,
            connection: None,
            known: HashSet::new(),
            script: redis::Script::new(APPLY_SCRIPT),
        }
    }

    /// Returns every cohort that has counters.
    pub async fn cohorts(&self) -> Result<Vec<CohortKey>, RedisError> {
        let mut connection = self.connection().await?;
        let command = redis::cmd("SMEMBERS").arg(keys::COHORTS).clone();
        let tags: Vec<String> = self.bounded(command.query_async(&mut connection)).await?;
        let mut cohorts: Vec<CohortKey> =
            tags.iter().filter_map(|t| CohortKey::from_tag(t)).collect();
        cohorts.sort();
        Ok(cohorts)
    }

    /// Reads the windows of `cohort` starting at `starts` (zeros where nothing was counted).
    pub async fn read(
        &self,
        cohort: &CohortKey,
        window: Window,
        starts: &[WindowStart],
    ) -> Result<Vec<WindowCounts>, RedisError> {
        let mut connection = self.connection().await?;
        let mut hashes = redis::pipe();
        for start in starts {
            hashes
                .cmd("HGETALL")
                .arg(keys::counts(cohort, window, *start));
        }
        let counts: Vec<BTreeMap<String, i64>> =
            self.bounded(hashes.query_async(&mut connection)).await?;
        let mut sketches = redis::pipe();
        let mut kinds_of = Vec::with_capacity(starts.len());
        for (start, counts) in starts.iter().zip(&counts) {
            sketches
                .cmd("PFCOUNT")
                .arg(keys::subjects(cohort, window, *start));
            let kinds: Vec<&str> = counts
                .keys()
                .filter_map(|f| f.strip_prefix("events:"))
                .collect();
            for kind in &kinds {
                sketches
                    .cmd("PFCOUNT")
                    .arg(keys::converted(cohort, window, *start, kind));
            }
            kinds_of.push(kinds);
        }
        let estimates: Vec<u64> = self.bounded(sketches.query_async(&mut connection)).await?;
        let mut estimates = estimates.into_iter();
        Ok(counts
            .iter()
            .zip(kinds_of)
            .map(|(counts, kinds)| WindowCounts {
                counts: counts.clone(),
                subjects: estimates.next().unwrap_or(0),
                converted: kinds
                    .into_iter()
                    .map(|kind| (kind.to_owned(), estimates.next().unwrap_or(0)))
                    .collect(),
            })
            .collect())
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(reply) => reply.map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// Returns the shared connection, connecting on first use.
    pub async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connect = self
            .connection
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config));
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(result) => Ok(result?.clone()),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// Sends PING and waits for PONG, within the configured timeout.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut connection = self.connection().await?;
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(reply) => reply.map(drop).map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }
}

/// Applies one cohort's cell: only when the cell is above the cohort's high-water mark, then
/// raises the mark, all in one atomic step. `KEYS[1]` is the mark; every further key comes with
/// `op, expire-at (ms), n` then n field/increment pairs (`h`) or n sketch elements (`p`).
const APPLY_SCRIPT: &str = r"
local cell = tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[1]) or '0') >= cell then return 0 end
local a = 2
for k = 2, #KEYS do
  local op, expire, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if op == 'h' then
    for i = 0, n - 1 do redis.call('HINCRBY', KEYS[k], ARGV[a + 2 * i], ARGV[a + 2 * i + 1]) end
    a = a + 2 * n
  else
    for i = a, a + n - 1, 1000 do
      redis.call('PFADD', KEYS[k], unpack(ARGV, i, math.min(i + 999, a + n - 1)))
    end
    a = a + n
  end
  redis.call('PEXPIREAT', KEYS[k], expire)
end
redis.call('SET', KEYS[1], cell)
return 1
";

/// Writes cohort updates over its own blocking connection, from one pipeline worker thread.
pub struct RedisWriter {
    client: redis::Client,
    timeout: Duration,
    retention: Retention,
    connection: Option<redis::Connection>,
    known: HashSet<CohortKey>,
    script: redis::Script,
}

impl RedisWriter {
    fn connect(&mut self) -> Result<&mut redis::Connection, RedisError> {
        if self.connection.is_none() {
            let connection = self.client.get_connection_with_timeout(self.timeout)?;
            connection.set_read_timeout(Some(self.timeout))?;
            connection.set_write_timeout(Some(self.timeout))?;
            let mut connection = connection;
            self.script.prepare_invoke().load(&mut connection)?;
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("connected above"))
    }

    fn invocation(&self, update: &CohortUpdate) -> redis::Cmd {
        let cohort = &update.cohort;
        let mut keys: Vec<String> = vec![keys::high_water(cohort)];
        let mut args: Vec<Vec<u8>> = vec![update.cell.to_string().into_bytes()];
        let mut op = |key: String, kind: &str, expire: i64, items: Vec<Vec<u8>>, n: usize| {
            keys.push(key);
            args.push(kind.as_bytes().to_vec());
            args.push(expire.to_string().into_bytes());
            args.push(n.to_string().into_bytes());
            args.extend(items);
        };
        for (window, start, delta) in &update.windows {
            let expire = self.retention.expires_at(*window, *start);
            let pairs: Vec<Vec<u8>> = delta
                .counts
                .iter()
                .flat_map(|(f, v)| [f.as_bytes().to_vec(), v.to_string().into_bytes()])
                .collect();
            if !pairs.is_empty() {
                op(
                    keys::counts(cohort, *window, *start),
                    "h",
                    expire,
                    pairs,
                    delta.counts.len(),
                );
            }
            let sketches =
                std::iter::once((keys::subjects(cohort, *window, *start), &delta.subjects)).chain(
                    delta.converted.iter().map(|(kind, subjects)| {
                        (keys::converted(cohort, *window, *start, kind), subjects)
                    }),
                );
            for (key, subjects) in sketches.filter(|(_, s)| !s.is_empty()) {
                let items = subjects.iter().map(|s| s.to_le_bytes().to_vec()).collect();
                op(key, "p", expire, items, subjects.len());
            }
        }
        let mut command = redis::cmd("EVALSHA");
        command
            .arg(self.script.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        command
    }
}

impl CounterWriter for RedisWriter {
    fn apply(&mut self, updates: &[CohortUpdate]) -> Result<(), CounterError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let new: Vec<CohortKey> = updates
            .iter()
            .map(|u| u.cohort.clone())
            .filter(|c| !self.known.contains(c))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !new.is_empty() {
            pipe.cmd("SADD")
                .arg(keys::COHORTS)
                .arg(new.iter().map(CohortKey::tag).collect::<Vec<_>>())
                .ignore();
        }
        for update in updates {
            pipe.add_command(self.invocation(update)).ignore();
        }
        let commands = updates.len() as u64 + u64::from(!new.is_empty());
        let result = self
            .connect()
            .and_then(|connection| pipe.query::<()>(connection).map_err(RedisError::from));
        metrics::counter!(REDIS_COMMANDS_TOTAL).increment(commands);
        match result {
            Ok(()) => {
                self.known.extend(new);
                Ok(())
            }
            Err(err) => {
                // The connection may be half-used or the server restarted (losing the script):
                // start over with a fresh one.
                self.connection = None;
                Err(err.into())
            }
        }
    }
}
