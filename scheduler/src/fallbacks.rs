//! What a client may say about its local fallbacks (`Scheduler.Fallbacks`). The report is the
//! client's word and becomes metric labels, so it is bounded: a few dozen causes, each a short
//! lower-case name, as `kiln stats` spells them.

use kiln_proto::v1::FallbackReport;

/// The most causes one report may carry.
const MAX_CAUSES: usize = 32;
/// The longest cause name.
const MAX_CAUSE: usize = 32;

/// Why `report` is refused, if it is.
pub fn check(report: &FallbackReport) -> Result<(), String> {
    if report.counts.len() > MAX_CAUSES {
        return Err(format!(
            "a fallback report carries at most {MAX_CAUSES} causes, not {}",
            report.counts.len()
        ));
    }
    for c in &report.counts {
        let name_ok = !c.cause.is_empty()
            && c.cause.len() <= MAX_CAUSE
            && c.cause.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if !name_ok {
            return Err(format!(
                "fallback cause {:?} is not a name like no_capacity (a-z and _, at most {MAX_CAUSE})",
                c.cause.chars().take(40).collect::<String>()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::FallbackCount;

    fn report(causes: &[&str]) -> FallbackReport {
        FallbackReport {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            counts: causes
                .iter()
                .map(|c| FallbackCount {
                    cause: (*c).into(),
                    count: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn reports_are_names_and_few() {
        assert!(check(&report(&["stalled", "no_capacity"])).is_ok());
        for bad in ["", "Stalled", "no-capacity", "a\"}", &"x".repeat(33)] {
            let e = check(&report(&[bad])).unwrap_err();
            assert!(e.contains("is not a name"), "{bad:?}: {e}");
        }
        let many: Vec<&str> = std::iter::repeat_n("stalled", 33).collect();
        assert!(check(&report(&many)).unwrap_err().contains("at most 32"));
    }
}
