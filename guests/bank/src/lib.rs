//! `bank`: 100 accounts (0..99) of 1000 each, total 100000, kept in linear memory.
//! `POST /transfer {"from": i, "to": j, "amount": a}` -> `200 {"applied": true, "seq": s}`,
//! `409 {"error": "insufficient funds"}`, or `400` (bad JSON, account or amount;
//! `from == to` counts as a bad account). `GET /balances`, `GET /account/<i>`.

use avail_guest::{Request, Response, json};

pub const ACCOUNTS: usize = 100;
pub const INITIAL_BALANCE: u64 = 1000;

pub struct Bank {
    balances: [u64; ACCOUNTS],
    /// Applied transfers; the last one's `seq`.
    transfers: u64,
}

impl Default for Bank {
    fn default() -> Self {
        Bank {
            balances: [INITIAL_BALANCE; ACCOUNTS],
            transfers: 0,
        }
    }
}

pub fn handle(state: &mut Bank, req: Request) -> Response {
    match (req.route(), req.method.as_str()) {
        ("/transfer", "POST") => transfer(state, &req.body),
        ("/balances", "GET") => ok(json::Object::new()
            .u64_array("balances", state.balances)
            .u64("total", state.balances.iter().sum())
            .u64("transfers", state.transfers)),
        ("/transfer", _) => Response::method_not_allowed("POST"),
        ("/balances", _) => Response::method_not_allowed("GET"),
        (route, method) => match route.strip_prefix("/account/") {
            None => Response::no_route(),
            Some(_) if method != "GET" => Response::method_not_allowed("GET"),
            Some(i) => match parse_account(i) {
                Some(i) => ok(json::Object::new()
                    .u64("account", i as u64)
                    .u64("balance", state.balances[i])),
                None => Response::error(404, "no such account"),
            },
        },
    }
}

fn transfer(state: &mut Bank, body: &[u8]) -> Response {
    let Some((from, to, amount)) = parse_transfer(body) else {
        return Response::error(400, r#"want {"from": i, "to": j, "amount": a}"#);
    };
    let account = |i: i64| usize::try_from(i).ok().filter(|&i| i < ACCOUNTS);
    let (Some(from), Some(to)) = (account(from), account(to)) else {
        return Response::error(400, "bad account");
    };
    if from == to {
        return Response::error(400, "from and to are the same account");
    }
    if amount <= 0 {
        return Response::error(400, "bad amount");
    }
    let amount = amount as u64;
    if state.balances[from] < amount {
        return Response::error(409, "insufficient funds");
    }
    state.balances[from] -= amount;
    state.balances[to] += amount;
    state.transfers += 1;
    ok(json::Object::new()
        .bool("applied", true)
        .u64("seq", state.transfers))
}

/// Exactly the integer fields `from`, `to`, `amount`, each once, in any order.
fn parse_transfer(body: &[u8]) -> Option<(i64, i64, i64)> {
    let (mut from, mut to, mut amount) = (None, None, None);
    for (key, value) in json::parse_int_object(body)? {
        let slot = match key.as_str() {
            "from" => &mut from,
            "to" => &mut to,
            "amount" => &mut amount,
            _ => return None,
        };
        if slot.replace(value).is_some() {
            return None;
        }
    }
    Some((from?, to?, amount?))
}

/// A decimal account number in `0..ACCOUNTS`.
fn parse_account(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&i| i < ACCOUNTS)
}

fn ok(body: json::Object) -> Response {
    Response::json(200, &body.finish())
}

avail_guest::export!(Bank, handle);

#[cfg(test)]
mod tests {
    use super::*;

    const TOTAL: u64 = ACCOUNTS as u64 * INITIAL_BALANCE;

    fn call(state: &mut Bank, method: &str, path: &str, body: &str) -> (u32, String) {
        let resp = handle(state, Request::new(method, path, body));
        (resp.status, resp.text())
    }

    fn send(state: &mut Bank, from: i64, to: i64, amount: i64) -> (u32, String) {
        let body = format!(r#"{{"from": {from}, "to": {to}, "amount": {amount}}}"#);
        call(state, "POST", "/transfer", &body)
    }

    fn applied(seq: u64) -> (u32, String) {
        (200, format!(r#"{{"applied":true,"seq":{seq}}}"#))
    }

    fn balance(state: &mut Bank, i: usize) -> String {
        call(state, "GET", &format!("/account/{i}"), "").1
    }

    #[test]
    fn initial_state() {
        let s = &mut Bank::default();
        let (status, body) = call(s, "GET", "/balances", "");
        let ones = vec!["1000"; ACCOUNTS].join(",");
        let expected = format!(r#"{{"balances":[{ones}],"total":100000,"transfers":0}}"#);
        assert_eq!((status, body), (200, expected));
        assert_eq!(balance(s, 0), r#"{"account":0,"balance":1000}"#);
        assert_eq!(balance(s, 99), r#"{"account":99,"balance":1000}"#);
    }

    #[test]
    fn transfers_and_seq() {
        let s = &mut Bank::default();
        assert_eq!(send(s, 0, 1, 300), applied(1));
        assert_eq!(send(s, 0, 99, 700), applied(2));
        assert_eq!(balance(s, 0), r#"{"account":0,"balance":0}"#);
        assert_eq!(balance(s, 1), r#"{"account":1,"balance":1300}"#);
        assert_eq!(balance(s, 99), r#"{"account":99,"balance":1700}"#);

        let insufficient = (409, r#"{"error":"insufficient funds"}"#.to_string());
        assert_eq!(send(s, 0, 1, 1), insufficient);
        assert_eq!(send(s, 1, 2, 1301), insufficient);
        assert_eq!(send(s, 1, 2, i64::MAX), insufficient);
        // Refused transfers use no seq number.
        assert_eq!(send(s, 1, 2, 1300), applied(3));
        let body = call(s, "GET", "/balances", "").1;
        assert!(body.starts_with(r#"{"balances":[0,0,2300,1000,"#), "{body}");
        assert!(
            body.ends_with(r#",1000,1700],"total":100000,"transfers":3}"#),
            "{body}"
        );
    }

    #[test]
    fn bad_requests() {
        let s = &mut Bank::default();
        for (from, to, amount) in [
            (0, 0, 1),
            (-1, 0, 1),
            (0, 100, 1),
            (100, 0, 1),
            (0, 1, 0),
            (0, 1, -5),
            (0, i64::MIN, 1),
        ] {
            assert_eq!(send(s, from, to, amount).0, 400, "{from} {to} {amount}");
        }
        for body in [
            "",
            "{}",
            "null",
            r#"{"from":0,"to":1}"#,
            r#"{"from":0,"to":1,"amount":1,"memo":2}"#,
            r#"{"from":0,"to":1,"amount":1,"amount":1}"#,
            r#"{"from":0,"to":1,"amount":1.5}"#,
            r#"{"from":"0","to":1,"amount":1}"#,
            r#"{"from":0,"to":1,"amount":99999999999999999999}"#,
            r#"{"from":0,"to":1,"amount":1} x"#,
        ] {
            assert_eq!(call(s, "POST", "/transfer", body).0, 400, "{body}");
        }
        let tolerant = "\n{ \"amount\" : 5 ,\t\"to\":0, \"from\":9 }\r\n";
        assert_eq!(call(s, "POST", "/transfer", tolerant), applied(1));
        assert_eq!(balance(s, 9), r#"{"account":9,"balance":995}"#);
    }

    #[test]
    fn routing() {
        let s = &mut Bank::default();
        assert_eq!(call(s, "GET", "/transfer", "").0, 405);
        assert_eq!(call(s, "POST", "/balances", "").0, 405);
        assert_eq!(call(s, "PUT", "/account/1", "").0, 405);
        assert_eq!(
            call(s, "GET", "/nope", ""),
            (404, r#"{"error":"no route"}"#.into())
        );
        for bad in ["100", "-1", "+1", "x", "", "1/2"] {
            let (status, body) = call(s, "GET", &format!("/account/{bad}"), "");
            assert_eq!(
                (status, body.as_str()),
                (404, r#"{"error":"no such account"}"#)
            );
        }
        assert_eq!(balance(s, 7), r#"{"account":7,"balance":1000}"#);
        let (status, _) = call(s, "GET", "/account/7?x=1", "");
        assert_eq!(status, 200);
    }

    #[test]
    fn total_is_invariant() {
        let s = &mut Bank::default();
        let mut seq = 0;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (from, to) = ((x % 100) as usize, ((x >> 8) % 100) as usize);
            let amount = ((x >> 16) % 1500) as i64;
            let before = s.balances[from];
            let (status, _) = send(s, from as i64, to as i64, amount);
            match status {
                200 => seq += 1,
                409 => assert!(before < amount as u64),
                _ => assert!(from == to || amount == 0),
            }
            assert_eq!(s.transfers, seq);
            assert_eq!(s.balances.iter().sum::<u64>(), TOTAL);
        }
        assert!(seq > 1000, "{seq}");
        let body = call(s, "GET", "/balances", "").1;
        assert!(body.ends_with(&format!(r#""total":100000,"transfers":{seq}}}"#)));
    }
}
