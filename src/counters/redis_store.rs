//! The Redis counter store's connection handling.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

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
    connection: std::sync::Arc<OnceCell<ConnectionManager>>,
}

impl RedisStore {
    /// Prepares a connection to `url`; nothing is sent until first use.
    pub fn open(url: &RedisUrl, timeout: Duration) -> Result<Self, RedisError> {
        let client = redis::Client::open(url.expose()).map_err(RedisError::InvalidUrl)?;
        Ok(Self {
            client,
            timeout,
            connection: Default::default(),
        })
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
