//! What operators and users read: `kiln dist-status` and the dashboard's data tell builders
//! apart and show their health, and a cache directory kiln cannot write is reported once, in
//! words that say what to do, while the compile goes on.

use kiln_tests::{ok, Farm};

#[test]
fn two_builders_with_one_name_are_told_apart_and_their_health_is_shown() {
    let mut farm = Farm::start(1, 1);
    // Two builders on one host both default to its host name.
    farm.start_builder_with(1, |c| c.name = "builder0".into());
    farm.wait_for_builders(2);
    let p = farm.project();

    let out = ok(&p.kiln(&["dist-status"])).clone();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let header = text.lines().find(|l| l.starts_with("BUILDER")).unwrap();
    assert!(header.ends_with("HEALTH"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("builder0")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| &r[..r.find(')').map_or(r.len(), |i| i + 1)])
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("builder0 (b")) && names[0] != names[1],
        "{text}"
    );
    assert!(rows.iter().all(|r| r.ends_with(" ok")), "{text}");

    // The dashboard's data says the same.
    let (status, body) =
        kiln_tests::http_request(&farm.http.to_string(), "GET", "/api/status", &[], b"");
    assert_eq!(status, 200);
    let dash: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut shown: Vec<&str> = dash["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    shown.sort_unstable();
    let mut listed = names.clone();
    listed.sort_unstable();
    assert_eq!(shown, listed);

    // A builder reported by a cross-check is shown as suspect in both.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        farm.grpc()
            .await
            .report(kiln_proto::v1::SuspectReport {
                protocol_version: kiln_proto::PROTOCOL_VERSION,
                builder: "builder0".into(),
                label: "a.c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let out = ok(&p.kiln(&["dist-status", "--json"])).clone();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for b in json["builders"].as_array().unwrap() {
        assert_eq!(b["health"], "suspect", "{json}");
        assert!(
            b["label"].as_str().unwrap().starts_with("builder0 (b"),
            "{json}"
        );
    }
    let out = ok(&p.kiln(&["dist-status"])).clone();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("builder0") && l.ends_with(" suspect"))
            .count(),
        2,
        "{text}"
    );

    // A builder whose name is its own keeps it unadorned.
    farm.kill_builder(1);
    farm.wait_for_builders(1);
    let json = farm.status();
    assert_eq!(json["builders"][0]["label"], "builder0", "{json}");
}
