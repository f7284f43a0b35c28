//! PostgreSQL set-up. Transactions run at READ COMMITTED; ordering comes from row locks.

use sqlx::AnyPool;

use crate::{Result, any_pool_options};

pub(crate) async fn open(url: &str, max_connections: u32) -> Result<AnyPool> {
    Ok(any_pool_options(max_connections).connect(url).await?)
}
