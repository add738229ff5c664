//! A transaction whose caller is dropped mid-BEGIN (a client that hung up,
//! an aborted task, a timeout) must not leave its pooled connection inside a
//! transaction: the next borrower's writes would run in it, hold its locks,
//! and vanish with it.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

use crate::common::database_url;

/// Polls `fut` `times` times, letting the runtime read its sockets in between, then
/// drops it unless it finished: a caller cancelled at some await. Varying
/// `times` lands the drop at every point of a begin, the window between the
/// BEGIN going out and its answer coming back among them.
async fn poll_then_drop<F: Future>(fut: F, times: usize) {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..times {
        if futures::poll!(fut.as_mut()).is_ready() {
            return;
        }
        // A timer, not a yield: the runtime parks and reads the sockets.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether the pool's next connection is inside a transaction: outside one,
/// a simple-protocol statement is its own transaction, so the transaction
/// started with the statement. (Over the extended protocol the two times
/// differ even outside a transaction, hence `raw_sql`.)
async fn in_transaction(pool: &sqlx::PgPool) -> bool {
    use sqlx::Row;
    let row = sqlx::raw_sql("SELECT now() <> statement_timestamp()").fetch_one(pool).await.unwrap();
    row.get::<bool, _>(0)
}

#[tokio::test]
async fn a_begin_dropped_mid_flight_leaves_no_transaction_open() {
    // One connection, so every borrower gets the one a cancelled begin used.
    let pool = PgPoolOptions::new().max_connections(1).connect(&database_url()).await.unwrap();
    let mut leaked = 0;
    for round in 0..200 {
        poll_then_drop(sessiond::db::begin(&pool), 1 + round % 5).await;
        // Give a BEGIN still on its way (and the rollback after it) time to land.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if in_transaction(&pool).await {
            leaked += 1;
            // Clean up so the next round starts from a clean connection.
            sqlx::query("ROLLBACK").execute(&pool).await.unwrap();
        }
    }
    assert_eq!(leaked, 0, "of 200 cancelled begins, {leaked} left their connection inside a transaction");
}
