//! The harness itself works: start, seed, one allocation, restart.

mod common;

use common::TestGateway;
use serde_json::json;

#[tokio::test]
async fn seed_reserve_and_restart() {
    let mut t = TestGateway::start().await;
    t.seed(3).await;
    let a = t
        .post("/v1/units/u1/reserve", json!({"tenancy_id": "t-future"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["status"], "reserved");
    t.restart().await;
    assert_eq!(t.status_of("u1").await, "reserved");
    t.stop().await;
}
