//! The report: one Markdown table of every scenario's rows, and the results file
//! (`bench/results.md` for a full run) that opens with the machine and the run's size.

use std::fmt::Write as _;
use std::path::Path;

use crate::procs::machine;

/// One row of the table, a cell per [`HEADER`] column.
pub type Row = [String; 9];

const HEADER: [&str; 9] = [
    "scenario",
    "run",
    "result",
    "vs. reference",
    "relay CPU s / 10k msgs",
    "relay peak RSS",
    "emulator CPU s",
    "receiver CPU s",
    "notes",
];

/// The rows of a run, in the order the scenarios ran.
#[derive(Default)]
pub struct Table {
    pub rows: Vec<Row>,
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| {} |", HEADER.join(" | "));
        let _ = writeln!(s, "|{}", HEADER.iter().map(|_| "---|").collect::<String>());
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

/// What the results file says of the run above the table.
pub struct RunSummary {
    pub messages: usize,
    pub size: usize,
    pub seconds: f64,
    pub quick: bool,
}

/// Write the table to `out`, under a heading and a line on the machine and the run.
pub fn write_results(out: &Path, md: &str, run: &RunSummary) -> anyhow::Result<()> {
    let mut doc = String::new();
    let _ = writeln!(doc, "# cfq-relay benchmark\n");
    let _ = writeln!(
        doc,
        "`bash bench/run.sh` on {} ({} CPUs), {} messages of {} bytes, {:.0} s in all{}.\n",
        machine(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        thousands(run.messages as f64),
        run.size,
        run.seconds,
        if run.quick {
            " (--quick: not figures to quote)"
        } else {
            ""
        }
    );
    doc.push_str(md);
    std::fs::write(out, doc)?;
    Ok(())
}

/// `v` rounded, with thousands separators: 12,345.
pub fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits_by_three() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.6), "1,234,568");
    }

    #[test]
    fn markdown_has_a_header_a_rule_and_a_line_per_row() {
        let mut table = Table::default();
        table.rows.push(std::array::from_fn(|i| format!("c{i}")));
        let md = table.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("| scenario | run | result |"));
        assert_eq!(lines[1], format!("|{}", "---|".repeat(9)));
        assert_eq!(lines[2], "| c0 | c1 | c2 | c3 | c4 | c5 | c6 | c7 | c8 |");
    }
}
