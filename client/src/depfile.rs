//! Make-style dependency files, as GCC and Clang write them with `-MD`.

/// The prerequisites named in a dependency file, unescaped, in order, without duplicates.
/// Targets are skipped; rules without prerequisites (`-MP` phony targets) contribute nothing.
pub fn prerequisites(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Join continuation lines: a backslash at the end of a line.
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    for line in joined.lines() {
        let mut after_colon = false;
        for token in tokens(line) {
            if !after_colon {
                after_colon = token.ends_with(':');
                continue;
            }
            if seen.insert(token.clone()) {
                out.push(token);
            }
        }
    }
    out
}

/// Splits a line at unescaped whitespace: `\ ` is a space in a name, `$$` is `$`, `\#` is `#`.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(' ' | '#' | '\\')) => {
                cur.push(chars.next().unwrap_or('\\'));
            }
            '$' if chars.peek() == Some(&'$') => {
                chars.next();
                cur.push('$');
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcc_style() {
        let text =
            "foo.o: foo.c /usr/include/stdio.h \\\n include/a\\ b.h \\\n /usr/include/x$$y.h\n";
        assert_eq!(
            prerequisites(text),
            [
                "foo.c",
                "/usr/include/stdio.h",
                "include/a b.h",
                "/usr/include/x$y.h"
            ]
        );
    }

    #[test]
    fn phony_targets_and_multiple_targets() {
        let text = "a.o b.o : a.c a.h\n\na.h:\n";
        assert_eq!(prerequisites(text), ["a.c", "a.h"]);
    }

    #[test]
    fn clang_style_one_per_line() {
        let text = "x.o: x.c \\\n  y.h \\\n  y.h\n";
        assert_eq!(prerequisites(text), ["x.c", "y.h"]);
    }
}
