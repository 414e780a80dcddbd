//! Console sessions in the database (`console_sessions`): every `seller serve` process on
//! one database knows a session made on any of them, so a load balancer needs no sticky
//! routing for the console. Stored by the SHA-256 of the cookie; a session ends
//! [`auth::SESSION_SECS`] after sign-in, at most [`auth::MAX_SESSIONS`] at once.

use std::time::Duration;

use super::auth::{self, Session};
use crate::server::db::Db;

const WITHIN: Duration = Duration::from_secs(3);

/// A new session: (cookie value, its CSRF token).
pub async fn create(db: &Db, address: &str, now: i64) -> Result<(String, String), String> {
    let (cookie, csrf) = (auth::random_token(), auth::random_token());
    let (id, c, a) = (
        auth::session_key(&cookie),
        csrf.clone(),
        address.to_string(),
    );
    let put = db.run(move |tx| {
        tx.put_console_session(
            &id,
            &c,
            &a,
            now,
            now - auth::SESSION_SECS,
            auth::MAX_SESSIONS,
        )
    });
    match tokio::time::timeout(WITHIN, put).await {
        Ok(Ok(())) => Ok((cookie, csrf)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the database did not answer within 3 s".into()),
    }
}

/// The session of `cookie`, if it is one and has not expired; a database that does not
/// answer signs nobody in.
pub async fn get(db: &Db, cookie: &str, now: i64) -> Option<Session> {
    let id = auth::session_key(cookie);
    let read = db.run(move |tx| tx.console_session(&id, now - auth::SESSION_SECS + 1));
    match tokio::time::timeout(WITHIN, read).await {
        Ok(Ok(found)) => found.map(|(csrf, address, created)| Session {
            csrf,
            address,
            created,
        }),
        Ok(Err(e)) => {
            log::error!("console session: {e}");
            None
        }
        Err(_) => {
            log::error!("console session: the database did not answer within 3 s");
            None
        }
    }
}

pub async fn remove(db: &Db, cookie: &str) -> Result<(), String> {
    let id = auth::session_key(cookie);
    match tokio::time::timeout(WITHIN, db.run(move |tx| tx.delete_console_session(&id))).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the database did not answer within 3 s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db;

    #[test]
    fn sessions_expire_are_found_by_cookie_only_and_are_capped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in db::tests::backends(dir.path()) {
            let db = Db::start(b);
            rt.block_on(async {
                let (c, csrf) = create(&db, "127.0.0.1", 1000).await.unwrap();
                let s = get(&db, &c, 1001).await.expect(name);
                assert_eq!(
                    (s.csrf.as_str(), s.address.as_str()),
                    (csrf.as_str(), "127.0.0.1")
                );
                assert!(get(&db, &csrf, 1001).await.is_none(), "{name}");
                assert!(
                    get(&db, &c, 1000 + auth::SESSION_SECS).await.is_none(),
                    "{name}"
                );
                remove(&db, &c).await.unwrap();
                assert!(get(&db, &c, 1001).await.is_none(), "{name}");
                // At most MAX_SESSIONS: the oldest goes first.
                let mut cookies = Vec::new();
                for i in 0..auth::MAX_SESSIONS + 1 {
                    cookies.push(create(&db, "a", 2000 + i).await.unwrap().0);
                }
                let now = 2000 + auth::MAX_SESSIONS + 1;
                assert!(get(&db, &cookies[0], now).await.is_none(), "{name}");
                assert!(get(&db, &cookies[1], now).await.is_some(), "{name}");
                assert!(
                    get(&db, cookies.last().unwrap(), now).await.is_some(),
                    "{name}"
                );
            });
        }
    }
}
