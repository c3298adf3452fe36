//! Compiler command lines: expansion of response files and classification.
//!
//! [`classify`] is a pure function from an argument list to either a [`Compile`] kiln can cache
//! exactly, or the [`Reason`] it cannot. Anything not understood is uncacheable: running the
//! real compiler unchanged is always correct, caching a misunderstood command is not.

use std::path::{Path, PathBuf};

use crate::names::named_enum;

named_enum! {
    /// Why a command is run by the real compiler without the cache. The names are stable: they
    /// appear in `kiln stats`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Reason {
        /// No `-c` or `-S`: the command links.
        Link = "link",
        /// `-E`: preprocess only.
        Preprocess = "preprocess",
        /// `-M` or `-MM` without `-MD`: dependencies only.
        DependenciesOnly = "dependencies_only",
        /// More than one source file in one command.
        MultipleSources = "multiple_sources",
        /// No source file found.
        NoSource = "no_source",
        /// The source is standard input (`-`).
        StdinSource = "stdin_source",
        /// `-save-temps` and friends write intermediate files.
        SaveTemps = "save_temps",
        /// Compiling a header creates a precompiled header.
        PchCreation = "pch_creation",
        /// An option kiln does not know, which may change the output.
        UnknownOption = "unknown_option",
        /// Output that kiln cannot capture: `-o -`, `-aux-info`, dump files, `-fstack-usage`...
        ExtraOutput = "extra_output",
        /// `-fsyntax-only` and similar produce no object.
        NoOutput = "no_output",
        /// Options whose output is not reproducible: `-v`, `-time`, `-ftime-report`...
        Nondeterministic = "nondeterministic",
        /// The command asks the compiler about itself and compiles nothing: `--version`, `--help`,
        /// `-dumpversion`, `-print-search-dirs`, `-###`...
        NotACompile = "not_a_compile",
        /// `@file` that cannot be read, nested too deeply, or malformed.
        ResponseFile = "response_file",
        /// `--coverage` / `-ftest-coverage` write a `.gcno` beside the object.
        Coverage = "coverage",
        /// Several `-arch` options (one object per architecture).
        MultipleArch = "multiple_arch",
        /// A language kiln does not cache: plain assembly, CUDA...
        Language = "language",
        /// `-Wp,` or `-Xpreprocessor` with options kiln cannot follow.
        PreprocessorPassthrough = "preprocessor_passthrough",
        /// Inputs that bring code kiln cannot hash: `-fplugin`, `-specs`, `-B`, `-wrapper`, modules.
        ExternalInputs = "external_inputs",
        /// An argument that is not UTF-8.
        NonUtf8 = "non_utf8",
        /// `__TIME__` or `__TIMESTAMP__` in the source or a header (without `SOURCE_DATE_EPOCH`).
        TimeMacros = "time_macros",
        /// `.incbin` in a source or header pulls in a file kiln does not track.
        Incbin = "incbin",
        /// A source or header changed while it was compiled (its change time is after the
        /// compile began, its stat changed since kiln read it, or it changed again as kiln read it).
        ModifiedDuringCompile = "modified_during_compile",
        /// A source or header was written so close to the compile's start that its timestamps
        /// cannot tell whether the compiler read it before or after: the same clock tick, or on a
        /// file system other than kiln's cache directory, within the timestamp slack.
        InputTooRecent = "input_too_recent",
        /// Environment variables that make the compiler write extra files.
        Environment = "environment",
        /// An output that is not a regular file: `-o /dev/null`, a pipe, a symbolic link.
        SpecialOutput = "special_output",
        /// A precompiled header would be used, which no dependency list names.
        PrecompiledHeader = "precompiled_header",
    }
}

/// The source language, as `-x` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    C,
    Cxx,
    ObjC,
    ObjCxx,
    AsmCpp,
    /// Already preprocessed C (`.i`) or C++ (`.ii`): no headers to track.
    CPreprocessed,
    CxxPreprocessed,
}

impl Lang {
    pub fn name(self) -> &'static str {
        match self {
            Lang::C => "c",
            Lang::Cxx => "c++",
            Lang::ObjC => "objective-c",
            Lang::ObjCxx => "objective-c++",
            Lang::AsmCpp => "assembler-with-cpp",
            Lang::CPreprocessed => "cpp-output",
            Lang::CxxPreprocessed => "c++-cpp-output",
        }
    }

    /// Whether the preprocessor runs (and so headers must be tracked).
    pub fn preprocessed(self) -> bool {
        !matches!(self, Lang::CPreprocessed | Lang::CxxPreprocessed)
    }

    fn from_x(name: &str) -> Result<Option<Lang>, Reason> {
        Ok(Some(match name {
            "none" => return Ok(None),
            "c" => Lang::C,
            "c++" => Lang::Cxx,
            "objective-c" => Lang::ObjC,
            "objective-c++" => Lang::ObjCxx,
            "assembler-with-cpp" => Lang::AsmCpp,
            "cpp-output" => Lang::CPreprocessed,
            "c++-cpp-output" => Lang::CxxPreprocessed,
            "c-header" | "c++-header" | "objective-c-header" | "objective-c++-header" => {
                return Err(Reason::PchCreation)
            }
            _ => return Err(Reason::Language),
        }))
    }

    /// The language of a file by its extension: `Ok(None)` for a non-source (linker) input.
    fn from_path(path: &str) -> Result<Option<Lang>, Reason> {
        let ext = Path::new(path)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        Ok(Some(match ext {
            "c" => Lang::C,
            "cc" | "cp" | "cxx" | "cpp" | "CPP" | "c++" | "C" => Lang::Cxx,
            "m" => Lang::ObjC,
            "mm" | "M" => Lang::ObjCxx,
            "S" | "sx" => Lang::AsmCpp,
            "i" => Lang::CPreprocessed,
            "ii" => Lang::CxxPreprocessed,
            "h" | "hh" | "hpp" | "hxx" | "H" | "h++" | "tcc" => return Err(Reason::PchCreation),
            "s" | "cu" | "f" | "f90" | "for" | "F" | "F90" | "go" | "d" | "ads" | "adb" => {
                return Err(Reason::Language)
            }
            _ => return Ok(None),
        }))
    }
}

/// A dependency file the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepFile {
    /// Where the compiler writes it.
    pub path: PathBuf,
    /// `-MMD`: system headers are left out, so it cannot serve as kiln's list of headers.
    pub user_headers_only: bool,
    /// Whether kiln must add `-MF path` (the user gave `-MD` without `-MF`).
    pub add_mf: bool,
}

/// Include directories in search order, as given (relative to the working directory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncludeDirs {
    /// `-iquote`: searched for `#include "..."` only, after the including file's directory.
    pub quote: Vec<String>,
    /// `-I`.
    pub angle: Vec<String>,
    /// `-isystem`.
    pub system: Vec<String>,
    /// `-idirafter`, searched after the compiler's own directories.
    pub after: Vec<String>,
}

/// What the command line tells the preprocessor beyond the include directories: what the
/// include scan, the cache's own `-M` and `-E` runs and precompiled-header detection all
/// follow, read here once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preprocessor {
    /// `-include` files, as given, in order.
    pub includes: Vec<String>,
    /// `-imacros` files, as given.
    pub imacros: Vec<String>,
    /// Macro definitions (`-D`, `--define-macro`, `-Wp,-D`) as written: `NAME` or `NAME=body`.
    pub defines: Vec<String>,
    /// `-nostdinc`: none of the compiler's own directories is searched.
    pub nostdinc: bool,
    /// `-nostdinc++`: the C++ library's directories are not searched.
    pub nostdincxx: bool,
    /// The first option whose effect on the headers read the include scan does not model: one
    /// that moves or prefixes the compiler's own directories (`--sysroot`, `-stdlib=`, `-m32`...),
    /// or a function-like `-D` macro wrapping `__has_include`. The preprocessor (`-M -v`) can
    /// still say what is read.
    pub unscannable: Option<String>,
}

/// Options that change which directories the compiler searches by default, or prefix them.
const MOVES_DEFAULT_DIRS: &[&str] = &[
    "--sysroot",
    "-isysroot",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
    "-iwithsysroot",
    "-imultilib",
    "-imultiarch",
    "-stdlib",
    "-target",
    "--target",
    "-gcc-toolchain",
    "--gcc-toolchain",
    "-resource-dir",
    "-cxx-isystem",
    "-iframework",
    "-F",
    "-m32",
    "-mx32",
    "-m16",
    "-mabi",
];

impl Preprocessor {
    /// Notes an option that moves the compiler's default directories.
    fn note_option(&mut self, arg: &str) {
        let name = arg.split_once('=').map_or(arg, |(n, _)| n);
        let moves = MOVES_DEFAULT_DIRS
            .iter()
            .any(|u| name == *u || (u.starts_with("-i") && arg.starts_with(u)))
            || (arg.starts_with("-F") && arg.len() > 2);
        if moves && self.unscannable.is_none() {
            self.unscannable = Some(arg.to_owned());
        }
    }

    /// `NAME=body` or `NAME` from `-D`.
    fn define(&mut self, def: &str) {
        let (name, body) = def.split_once('=').unwrap_or((def, "1"));
        // A function-like macro from the command line that wraps `__has_include` would make
        // probes a scan cannot see.
        if name.contains('(') && body.contains("__has_") && self.unscannable.is_none() {
            self.unscannable = Some(format!("-D{def}"));
        }
        self.defines.push(def.to_owned());
    }
}

/// A single compile kiln can cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compile {
    /// The full argument list to run, response files expanded.
    pub args: Vec<String>,
    /// The source file, as given.
    pub source: String,
    pub lang: Lang,
    /// The object (or assembly with `-S`), explicit or as the compiler derives it.
    pub output: PathBuf,
    /// `-S`: the output is assembly text.
    pub assembly: bool,
    pub dep_file: Option<DepFile>,
    /// `-MT`/`-MQ` given: the dependency target does not follow the output's name.
    pub dep_target_given: bool,
    /// `-gsplit-dwarf`: a `.dwo` is written beside the output.
    pub split_dwarf: bool,
    /// Debug information is generated (the object records the working directory).
    pub debug: bool,
    /// The object embeds its own absolute path (`-fprofile-arcs`, `-fprofile-generate`).
    pub embeds_output_path: bool,
    /// `-fdebug-prefix-map`/`-ffile-prefix-map` mappings, old to new: paths in debug info.
    pub prefix_maps: Vec<(String, String)>,
    /// `-fmacro-prefix-map`/`-ffile-prefix-map` mappings: paths in `__FILE__`.
    pub macro_maps: Vec<(String, String)>,
    /// `-fdebug-compilation-dir` given: the working directory is not recorded.
    pub comp_dir_given: bool,
    /// Diagnostics colour was chosen explicitly.
    pub color_given: bool,
    /// Profile data read by the compile (`-fprofile-use` and friends): a file or a directory.
    pub profile_inputs: Vec<PathBuf>,
    /// `-fprofile-use` without a path: the `.gcda` beside the output (gcc) or
    /// `default.profdata` in the working directory (clang) is read.
    pub profile_use_default: bool,
    /// The profile file read depends on the output's absolute path (`-fprofile-use=DIR`,
    /// `-fprofile-dir`), or the object records the working directory for another reason
    /// (`-fcoverage-mapping`, assembler debug info): the key includes both.
    pub records_cwd: bool,
    /// `-march=native` and the like: the output depends on the host CPU.
    pub native_cpu: bool,
    pub include_dirs: IncludeDirs,
    pub preprocessor: Preprocessor,
    /// The arguments that go into the cache key, in order: everything except the source, the
    /// output and the dependency file's location (which are hashed separately where they
    /// matter).
    pub hashed_args: Vec<String>,
}

/// Either a cacheable compile or the reason it is not.
pub type Classified = Result<Compile, Reason>;

/// How deeply `@file` may nest.
const MAX_RESPONSE_DEPTH: usize = 16;

/// Expands `@file` arguments the way GCC does: whitespace separates, single and double quotes
/// group, a backslash escapes the next character; nested files are expanded too. A file that
/// cannot be read makes the command uncacheable (GCC would pass the text on literally).
pub fn expand_response_files(args: &[String], cwd: &Path) -> Result<Vec<String>, Reason> {
    fn expand(
        args: &[String],
        cwd: &Path,
        depth: usize,
        out: &mut Vec<String>,
    ) -> Result<(), Reason> {
        for arg in args {
            match arg.strip_prefix('@') {
                Some(file) if !file.is_empty() => {
                    if depth >= MAX_RESPONSE_DEPTH {
                        return Err(Reason::ResponseFile);
                    }
                    let text = std::fs::read_to_string(cwd.join(file))
                        .map_err(|_| Reason::ResponseFile)?;
                    expand(&split_response(&text)?, cwd, depth + 1, out)?;
                }
                _ => out.push(arg.clone()),
            }
        }
        Ok(())
    }
    let mut out = Vec::with_capacity(args.len());
    expand(args, cwd, 0, &mut out)?;
    Ok(out)
}

fn split_response(text: &str) -> Result<Vec<String>, Reason> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\\') => {
                cur.push(chars.next().ok_or(Reason::ResponseFile)?);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(Reason::ResponseFile);
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// Options followed by a separate argument, which kiln hashes with the option.
const WITH_ARG: &[&str] = &[
    "-D",
    "-U",
    "-I",
    "-include",
    "-imacros",
    "-iquote",
    "-isystem",
    "-idirafter",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
    "-isysroot",
    "-imultilib",
    "-Xassembler",
    "-Xlinker",
    "--param",
    "-target",
    "-arch",
    "-L",
    "-l",
    "-T",
    "-u",
    "-z",
    "-A",
    "--sysroot",
    "-gcc-toolchain",
    "-resource-dir",
    "-MT",
    "-MQ",
    "-MF",
    "-o",
    "-x",
    "-Xclang",
    "-Xpreprocessor",
    "-aux-info",
    "-B",
    "-specs",
    "-wrapper",
    "-dumpbase",
    "-dumpdir",
    "-include-pch",
    "-stdlib",
    "--include-directory",
    "--define-macro",
];

/// Options that take a separate argument only in the spelled-out form (`-x c`), but also come
/// joined (`-xc`). Order matters: longer prefixes first.
const JOINED_PREFIXES: &[&str] = &[
    "-iwithprefixbefore",
    "-iwithprefix",
    "-include-pch",
    "-imacros",
    "-include",
    "-iquote",
    "-isystem",
    "-idirafter",
    "-iprefix",
    "-isysroot",
    "-imultilib",
    "-MT",
    "-MQ",
    "-MF",
    "-D",
    "-U",
    "-I",
    "-L",
    "-l",
    "-o",
    "-x",
    "-A",
    "-B",
    "-T",
    "-u",
    "-z",
];

/// Options without an argument that never change what kiln must capture, beyond being hashed.
const PLAIN: &[&str] = &[
    "-c",
    "-S",
    "-pipe",
    "-w",
    "-pedantic",
    "-pedantic-errors",
    "-ansi",
    "-pthread",
    "-pthreads",
    "-nostdinc",
    "-nostdinc++",
    "-nostdlib",
    "-nostdlib++",
    "-nodefaultlibs",
    "-nostartfiles",
    "-static",
    "-shared",
    "-rdynamic",
    "-s",
    "-P",
    "-C",
    "-CC",
    "-H",
    "-trigraphs",
    "-traditional",
    "-traditional-cpp",
    "-undef",
    "-no-integrated-cpp",
    "-integrated-as",
    "-no-integrated-as",
    "-static-libgcc",
    "-static-libstdc++",
    "-pie",
    "-no-pie",
    "-symbolic",
    "-MP",
    "-MD",
    "-MMD",
    "-MG",
    "-emit-llvm",
    "-Qunused-arguments",
    "-fsyntax-only",
    "-Xanalyzer",
    "--no-warnings",
    "-Qn",
    "-Qy",
];

/// Prefixes of families of options that only change the output in ways the key captures.
const FAMILIES: &[&str] = &[
    "-f",
    "-W",
    "-m",
    "-O",
    "-g",
    "-std=",
    "--std=",
    "-stdlib=",
    "--target=",
    "--sysroot=",
    "-march",
    "-mtune",
    "-mcpu",
    "--param=",
];

/// Classifies an expanded argument list (without the compiler itself).
pub fn classify(args: Vec<String>) -> Classified {
    classify_explained(args).map_err(|r| r.reason)
}

/// Why a command is uncacheable, with the argument that decided it when one did (an option
/// with its value), for the debug line that explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Reason,
    pub arg: Option<String>,
}

impl From<Reason> for Refused {
    fn from(reason: Reason) -> Refused {
        Refused { reason, arg: None }
    }
}

/// [`classify`], naming the argument that made the command uncacheable.
pub fn classify_explained(args: Vec<String>) -> Result<Compile, Refused> {
    let mut c = Parser::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let next = args.get(i + 1).map(String::as_str);
        c.pre.note_option(arg);
        let consumed = c.option(arg, next).map_err(|reason| Refused {
            reason,
            arg: Some(match next {
                Some(value) if WITH_ARG.contains(&arg) => format!("{arg} {value}"),
                _ => arg.to_owned(),
            }),
        })?;
        i += consumed;
    }
    c.finish(args).map_err(Refused::from)
}

/// A compile's arguments without its outputs and dependency options: what the preprocessor is
/// run with when kiln asks it something (`-M` for the headers, `-M -v` for the farm's inputs,
/// `-E` for preprocessor mode), so every such run reads the same command.
pub fn without_outputs(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 3);
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match a.as_str() {
            "-o" | "-MF" | "-MT" | "-MQ" => skip_next = true,
            "-c" | "-S" | "-MD" | "-MMD" | "-MP" => {}
            s if s.starts_with("-Wp,-MD,") || s.starts_with("-Wp,-MMD,") => {}
            s if s.len() > 3
                && (s.starts_with("-MF") || s.starts_with("-MT") || s.starts_with("-MQ")) => {}
            s if s.len() > 2 && s.starts_with("-o") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// The first argument that names a source file, as far as a command kiln could not classify
/// shows it: for the debug line that says which compile was not cached.
pub fn source_in(args: &[String]) -> Option<&str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if WITH_ARG.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') && matches!(Lang::from_path(a), Ok(Some(_)) | Err(_)) {
            return Some(a);
        }
    }
    None
}

#[derive(Default)]
struct Parser {
    sources: Vec<(String, Lang)>,
    x_lang: Option<Lang>,
    output: Option<String>,
    compile_only: bool,
    assembly: bool,
    preprocess_only: bool,
    deps_only: bool,
    /// `-MG`: only meaningful with `-M`/`-MM`; without them gcc says so, and kiln's own `-MD`
    /// would change that message.
    deps_missing_ok: bool,
    dep_md: bool,
    dep_mmd: bool,
    dep_mf: Option<String>,
    dep_target_given: bool,
    split_dwarf: bool,
    debug: bool,
    embeds_output_path: bool,
    prefix_maps: Vec<(String, String)>,
    macro_maps: Vec<(String, String)>,
    comp_dir_given: bool,
    color_given: bool,
    profile_inputs: Vec<PathBuf>,
    profile_use_default: bool,
    records_cwd: bool,
    native_cpu: bool,
    archs: usize,
    dirs: IncludeDirs,
    pre: Preprocessor,
    hashed: Vec<String>,
}

impl Parser {
    /// Handles one option; returns how many arguments it used.
    fn option(&mut self, arg: &str, next: Option<&str>) -> Result<usize, Reason> {
        if arg == "-" {
            return Err(Reason::StdinSource);
        }
        if !arg.starts_with('-') || arg.len() == 1 {
            return self.input(arg).map(|()| 1);
        }

        // Separate-argument options: `-I dir`, `-o out`.
        if WITH_ARG.contains(&arg) {
            let value = next.ok_or(Reason::UnknownOption)?;
            self.with_value(arg, value)?;
            return Ok(2);
        }
        // `--opt=value` spellings of separate-argument options.
        if let Some((name, value)) = arg.split_once('=') {
            if matches!(
                name,
                "--include-directory" | "--define-macro" | "--sysroot" | "-specs"
            ) {
                self.with_value(name, value)?;
                return Ok(1);
            }
        }
        // Joined forms: `-Idir`, `-ofile`, `-xc`.
        for prefix in JOINED_PREFIXES {
            if let Some(value) = arg.strip_prefix(prefix) {
                if !value.is_empty() && !joined_is_other_option(prefix, arg) {
                    self.with_value(prefix, value)?;
                    return Ok(1);
                }
            }
        }
        self.flag(arg)?;
        Ok(1)
    }

    fn input(&mut self, path: &str) -> Result<(), Reason> {
        let lang = match self.x_lang {
            Some(l) => Some(l),
            None => Lang::from_path(path)?,
        };
        match lang {
            Some(l) => self.sources.push((path.to_owned(), l)),
            // A linker input beside `-c` is ignored by the compiler with a warning.
            None => return Err(Reason::Link),
        }
        Ok(())
    }

    fn with_value(&mut self, opt: &str, value: &str) -> Result<(), Reason> {
        let keep = |p: &mut Parser| {
            p.hashed.push(opt.to_owned());
            p.hashed.push(value.to_owned());
        };
        match opt {
            "-o" => {
                if value == "-" {
                    return Err(Reason::ExtraOutput);
                }
                self.output = Some(value.to_owned());
            }
            "-x" => self.x_lang = Lang::from_x(value)?,
            "-MF" => self.dep_mf = Some(value.to_owned()),
            "-MT" | "-MQ" => {
                self.dep_target_given = true;
                keep(self);
            }
            "-I" | "--include-directory" => {
                if value != "-" {
                    self.dirs.angle.push(value.to_owned());
                }
                keep(self);
            }
            "-iquote" => {
                self.dirs.quote.push(value.to_owned());
                keep(self);
            }
            "-isystem" => {
                self.dirs.system.push(value.to_owned());
                keep(self);
            }
            "-idirafter" => {
                self.dirs.after.push(value.to_owned());
                keep(self);
            }
            "-include" => {
                self.pre.includes.push(value.to_owned());
                keep(self);
            }
            "-imacros" => {
                self.pre.imacros.push(value.to_owned());
                keep(self);
            }
            "-D" | "--define-macro" => {
                self.pre.define(value);
                keep(self);
            }
            "-arch" => {
                self.archs += 1;
                if self.archs > 1 {
                    return Err(Reason::MultipleArch);
                }
                keep(self);
            }
            "-Xclang" => {
                // Only options that change nothing kiln must capture are followed.
                if !matches!(value, "-fno-pch-timestamp" | "-fcolor-diagnostics")
                    && !value.starts_with("-fdebug-compilation-dir")
                {
                    return Err(Reason::UnknownOption);
                }
                keep(self);
            }
            "-Xpreprocessor" => return Err(Reason::PreprocessorPassthrough),
            "-Xassembler" => {
                self.assembler_option(value)?;
                keep(self);
            }
            "-aux-info" | "-dumpbase" | "-dumpdir" => return Err(Reason::ExtraOutput),
            "-B" | "-specs" | "-wrapper" | "-include-pch" => return Err(Reason::ExternalInputs),
            _ => keep(self),
        }
        Ok(())
    }

    fn flag(&mut self, arg: &str) -> Result<(), Reason> {
        match arg {
            "-c" => self.compile_only = true,
            "-S" => self.assembly = true,
            "-E" => self.preprocess_only = true,
            "-M" | "-MM" => self.deps_only = true,
            "-MG" => self.deps_missing_ok = true,
            "-MD" => self.dep_md = true,
            "-MMD" => self.dep_mmd = true,
            "-v" | "-time" | "-Q" => return Err(Reason::Nondeterministic),
            "--version" | "--help" | "--target-help" | "-dumpversion" | "-dumpfullversion"
            | "-dumpmachine" | "-dumpspecs" | "-###" => return Err(Reason::NotACompile),
            "-save-temps" | "--save-temps" => return Err(Reason::SaveTemps),
            "--coverage" | "-ftest-coverage" => return Err(Reason::Coverage),
            "-fsyntax-only" | "--analyze" | "-analyze" => return Err(Reason::NoOutput),
            "-fprofile-arcs" | "-fprofile-generate" => self.embeds_output_path = true,
            "-fprofile-use" => self.profile_use_default = true,
            // clang's `=split` is the plain form; `=single` keeps the DWARF in the object.
            "-gsplit-dwarf" | "-gsplit-dwarf=split" => {
                self.split_dwarf = true;
                self.debug = true;
            }
            "-g0" | "-ggdb0" | "-gline-tables-only0" => self.debug = false,
            "-nostdinc" => self.pre.nostdinc = true,
            "-nostdinc++" => self.pre.nostdincxx = true,
            _ => return self.flag_family(arg),
        }
        if !matches!(arg, "-c" | "-MD" | "-MMD") {
            self.hashed.push(arg.to_owned());
        }
        Ok(())
    }

    fn flag_family(&mut self, arg: &str) -> Result<(), Reason> {
        if ["-print-", "--print-", "--help="]
            .iter()
            .any(|p| arg.starts_with(p))
        {
            return Err(Reason::NotACompile);
        }
        if arg.starts_with("-save-temps=") {
            return Err(Reason::SaveTemps);
        }
        if let Some(rest) = arg.strip_prefix("-Wp,") {
            return self.wp(rest);
        }
        if let Some(rest) = arg.strip_prefix("-Wa,") {
            for a in rest.split(',') {
                self.assembler_option(a)?;
            }
        }
        if let Some(rest) = arg.strip_prefix("-f") {
            self.f_option(rest)?;
        } else if let Some(rest) = arg.strip_prefix("-g") {
            // `-g`, `-g3`, `-ggdb`, `-gdwarf-4`... turn debug info on; `-gno-*` modifiers do not.
            if !rest.starts_with("no-") && !rest.starts_with("column-info") {
                self.debug = !rest.ends_with('0') || rest.starts_with("dwarf");
            }
            if rest == "toggle" {
                return Err(Reason::UnknownOption);
            }
        } else if arg.starts_with("-d") {
            // `-dM`, `-dD`... dump macros or RTL to extra files.
            return Err(Reason::ExtraOutput);
        } else if arg.starts_with("-MJ") {
            return Err(Reason::ExtraOutput);
        } else if !PLAIN.contains(&arg) && !FAMILIES.iter().any(|f| arg.starts_with(f)) {
            return Err(Reason::UnknownOption);
        }
        if arg.contains("=native") {
            self.native_cpu = true;
        }
        self.hashed.push(arg.to_owned());
        Ok(())
    }

    /// An option for the assembler (`-Wa,X` or `-Xassembler X`).
    fn assembler_option(&mut self, a: &str) -> Result<(), Reason> {
        // Listings and dependency files written by the assembler are extra outputs.
        if a.starts_with("-a") || a.starts_with("--MD") {
            return Err(Reason::ExtraOutput);
        }
        // Assembler debug info records the working directory.
        if a == "-g"
            || a.starts_with("--gdwarf")
            || a.starts_with("--gstabs")
            || a.starts_with("-gdwarf")
        {
            self.records_cwd = true;
        }
        Ok(())
    }

    fn f_option(&mut self, rest: &str) -> Result<(), Reason> {
        let value = |prefix: &str| rest.strip_prefix(prefix);
        let pair = |map: &str| {
            map.split_once('=')
                .map(|(o, n)| (o.to_owned(), n.to_owned()))
        };
        if let Some(map) = value("debug-prefix-map=") {
            self.prefix_maps.extend(pair(map));
        } else if let Some(map) = value("macro-prefix-map=") {
            self.macro_maps.extend(pair(map));
        } else if let Some(map) = value("file-prefix-map=") {
            self.prefix_maps.extend(pair(map));
            self.macro_maps.extend(pair(map));
        } else if value("debug-compilation-dir").is_some() {
            self.comp_dir_given = true;
        } else if rest.starts_with("diagnostics-color")
            || rest.starts_with("no-diagnostics-color")
            || rest == "color-diagnostics"
            || rest == "no-color-diagnostics"
        {
            self.color_given = true;
        } else if let Some(p) = value("profile-use=")
            .or_else(|| value("profile-instr-use="))
            .or_else(|| value("profile-sample-use="))
            .or_else(|| value("auto-profile="))
        {
            self.profile_inputs.push(PathBuf::from(p));
            // gcc reads `DIR/<mangled absolute output path>.gcda` from a directory.
            self.records_cwd = true;
        } else if let Some(dir) = value("profile-dir=") {
            self.profile_inputs.push(PathBuf::from(dir));
            self.records_cwd = true;
        } else if rest == "coverage-mapping" {
            self.records_cwd = true;
        } else if value("profile-generate=").is_some() {
            self.embeds_output_path = true;
        } else if rest.starts_with("dump-")
            || (rest.starts_with("opt-info") && rest.contains('='))
            || rest == "stack-usage"
            || rest.starts_with("callgraph-info")
            || rest.starts_with("opt-record")
            || rest.starts_with("save-optimization-record")
        {
            return Err(Reason::ExtraOutput);
        } else if rest.starts_with("proc-stat-report")
            || rest == "time-report"
            || rest == "mem-report"
            || rest.starts_with("time-trace")
            || rest == "stats"
        {
            return Err(Reason::Nondeterministic);
        } else if rest.starts_with("plugin")
            || rest == "modules"
            || rest.starts_with("modules-ts")
            || rest.starts_with("module-header")
            || rest.starts_with("module-file")
            || rest == "repo"
        {
            return Err(Reason::ExternalInputs);
        }
        Ok(())
    }

    /// `-Wp,-MD,file` and `-Wp,-MMD,file` (as the Linux kernel uses) are dependency files;
    /// `-Wp,-D…`, `-Wp,-U…`, `-Wp,-I…` are plain preprocessor options; nothing else is followed.
    fn wp(&mut self, rest: &str) -> Result<(), Reason> {
        let parts: Vec<&str> = rest.split(',').collect();
        match parts.as_slice() {
            ["-MD", file] => {
                self.dep_md = true;
                self.dep_mf = Some((*file).to_owned());
            }
            ["-MMD", file] => {
                self.dep_mmd = true;
                self.dep_mf = Some((*file).to_owned());
            }
            _ if parts
                .iter()
                .all(|p| p.starts_with("-D") || p.starts_with("-U") || p.starts_with("-I")) =>
            {
                for d in parts.iter().filter_map(|p| p.strip_prefix("-D")) {
                    self.pre.define(d);
                }
                self.hashed.push(format!("-Wp,{rest}"));
            }
            _ => return Err(Reason::PreprocessorPassthrough),
        }
        Ok(())
    }

    fn finish(self, args: Vec<String>) -> Classified {
        if self.preprocess_only {
            return Err(Reason::Preprocess);
        }
        if self.deps_only && !(self.dep_md || self.dep_mmd) {
            return Err(Reason::DependenciesOnly);
        }
        if self.deps_missing_ok && !self.deps_only {
            return Err(Reason::UnknownOption);
        }
        if !self.compile_only && !self.assembly {
            return Err(Reason::Link);
        }
        let (source, lang) = match self.sources.as_slice() {
            [] => return Err(Reason::NoSource),
            [one] => one.clone(),
            _ => return Err(Reason::MultipleSources),
        };
        let output = match &self.output {
            Some(o) => PathBuf::from(o),
            None => {
                let stem = Path::new(&source).file_stem().unwrap_or_default();
                let mut name = stem.to_os_string();
                name.push(if self.assembly { ".s" } else { ".o" });
                PathBuf::from(name)
            }
        };
        let dep_file = (self.dep_md || self.dep_mmd).then(|| {
            let (path, add_mf) = match &self.dep_mf {
                Some(p) => (PathBuf::from(p), false),
                None => (default_dep_file(self.output.as_deref(), &source), true),
            };
            DepFile {
                path,
                user_headers_only: !self.dep_md,
                add_mf,
            }
        });
        Ok(Compile {
            args,
            source,
            lang,
            output,
            assembly: self.assembly,
            dep_file,
            dep_target_given: self.dep_target_given,
            split_dwarf: self.split_dwarf,
            debug: self.debug,
            embeds_output_path: self.embeds_output_path,
            prefix_maps: self.prefix_maps,
            macro_maps: self.macro_maps,
            comp_dir_given: self.comp_dir_given,
            color_given: self.color_given,
            profile_inputs: self.profile_inputs,
            profile_use_default: self.profile_use_default,
            records_cwd: self.records_cwd,
            native_cpu: self.native_cpu,
            include_dirs: self.dirs,
            preprocessor: self.pre,
            hashed_args: self.hashed,
        })
    }
}

/// A joined prefix that is really the start of another option: `-undef` is not `-u ndef`.
/// (Prefixes are case-sensitive and the longer `-i…` forms are tried first, so this is the one
/// collision.)
fn joined_is_other_option(prefix: &str, arg: &str) -> bool {
    prefix == "-u" && arg == "-undef"
}

/// Where GCC and Clang write `-MD` output without `-MF`: the output with its extension
/// replaced by `.d`, or the source's stem plus `.d` in the working directory.
pub fn default_dep_file(output: Option<&str>, source: &str) -> PathBuf {
    match output {
        Some(o) => Path::new(o).with_extension("d"),
        None => {
            let mut name = Path::new(source)
                .file_stem()
                .unwrap_or_default()
                .to_os_string();
            name.push(".d");
            PathBuf::from(name)
        }
    }
}

/// Where the split DWARF file goes: the output with its extension replaced by `.dwo`.
pub fn dwo_path(output: &Path) -> PathBuf {
    output.with_extension("dwo")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn what_the_preprocessor_is_told_is_read_once() {
        let c = classify(words(
            "-c a.c -include f.h -includeg.h -imacros m.h -DA -D B=<b.h> --define-macro=C \
             -Wp,-DD=1,-UE -nostdinc++ -o a.o",
        ))
        .unwrap();
        let p = &c.preprocessor;
        assert_eq!(p.includes, ["f.h", "g.h"]);
        assert_eq!(p.imacros, ["m.h"]);
        assert_eq!(p.defines, ["A", "B=<b.h>", "C", "D=1"]);
        assert!(!p.nostdinc && p.nostdincxx);
        assert_eq!(p.unscannable, None);
        for (line, option) in [
            ("-c a.c --sysroot=/x", "--sysroot=/x"),
            ("-c a.c --sysroot /x", "--sysroot"),
            ("-c a.c -m32 -stdlib=libc++", "-m32"),
            ("-c a.c -iwithprefix y", "-iwithprefix"),
            ("-c a.c -DH(x)=__has_include(x)", "-DH(x)=__has_include(x)"),
        ] {
            let c = classify(words(line)).unwrap();
            assert_eq!(
                c.preprocessor.unscannable.as_deref(),
                Some(option),
                "{line}"
            );
        }
    }

    #[test]
    fn preprocessor_runs_drop_outputs_and_dependency_options() {
        let args = words("-c a.c -o a.o -MMD -MF a.d -MTx -O2 -Wp,-MMD,k.d");
        assert_eq!(without_outputs(&args), ["a.c", "-O2"]);
    }

    /// Command lines as gcc and clang users write them, and what kiln makes of them.
    #[test]
    fn classification_table() {
        let cacheable = [
            "-c foo.c",
            "-c foo.c -o out/foo.o",
            "-c -O2 -g -Wall -Iinclude -I include2 -DNDEBUG -DX=1 foo.c -o foo.o",
            "-c foo.cc -std=c++17 -fPIC -o foo.o",
            "-c foo.cpp -MD -MT foo.o -MF foo.o.d -o foo.o",
            "-c foo.c -MMD -MP",
            "-c foo.c -Wp,-MD,.foo.o.d -o foo.o",
            "-c foo.c -gsplit-dwarf -o foo.o",
            "-c -x c foo.txt -o foo.o",
            "-c foo.S -o foo.o",
            "-c foo.i -o foo.o",
            "-S foo.c -o foo.s",
            "-c foo.c -isystem /opt/inc -iquote q -idirafter late -include pre.h",
            "-c foo.c -fdebug-prefix-map=/src=. -ffile-prefix-map=/a=/b",
            "-c foo.c -fprofile-use=prof -march=native",
            "-c foo.c -Wl,--as-needed -Wa,--noexecstack -pthread",
            "-c foo.c -fdiagnostics-color=always",
            "-c foo.c -target x86_64-linux-gnu --sysroot=/sys",
            "-c foo.c -undef -include pre.h -imacros m.h",
        ];
        for cmd in cacheable {
            assert!(
                classify(words(cmd)).is_ok(),
                "should be cacheable: {cmd}: {:?}",
                classify(words(cmd))
            );
        }
        let uncacheable = [
            ("foo.c -o foo", Reason::Link),
            ("foo.o bar.o -o app", Reason::Link),
            ("-c foo.c bar.o", Reason::Link),
            ("-E foo.c", Reason::Preprocess),
            ("-M foo.c", Reason::DependenciesOnly),
            ("-MM foo.c", Reason::DependenciesOnly),
            ("-c foo.c bar.c", Reason::MultipleSources),
            ("-c", Reason::NoSource),
            ("-c -x c -", Reason::StdinSource),
            ("-c foo.c -save-temps", Reason::SaveTemps),
            ("-c foo.c -save-temps=obj", Reason::SaveTemps),
            ("-c foo.h", Reason::PchCreation),
            ("-c -x c++-header foo.hpp", Reason::PchCreation),
            ("-c foo.c --frobnicate", Reason::UnknownOption),
            ("-c foo.c -Xclang -load", Reason::UnknownOption),
            ("-c foo.c -o -", Reason::ExtraOutput),
            ("-c foo.c -fdump-tree-all", Reason::ExtraOutput),
            ("-c foo.c -fstack-usage", Reason::ExtraOutput),
            ("-c foo.c -dM", Reason::ExtraOutput),
            ("-c foo.c -fsyntax-only", Reason::NoOutput),
            ("-c foo.c -v", Reason::Nondeterministic),
            ("--version", Reason::NotACompile),
            ("-c foo.c --version", Reason::NotACompile),
            ("--help", Reason::NotACompile),
            ("--help=optimizers", Reason::NotACompile),
            ("-dumpversion", Reason::NotACompile),
            ("-dumpfullversion", Reason::NotACompile),
            ("-dumpmachine", Reason::NotACompile),
            ("-print-search-dirs", Reason::NotACompile),
            ("-print-file-name=libc.so", Reason::NotACompile),
            ("-print-prog-name=cc1", Reason::NotACompile),
            ("--print-resource-dir", Reason::NotACompile),
            ("-### -c foo.c", Reason::NotACompile),
            ("-v", Reason::Nondeterministic),
            ("-c foo.c -ftime-report", Reason::Nondeterministic),
            ("-c foo.c --coverage", Reason::Coverage),
            ("-c foo.c -arch x86_64 -arch arm64", Reason::MultipleArch),
            ("-c foo.s", Reason::Language),
            ("-c foo.c -Wp,-dD", Reason::PreprocessorPassthrough),
            (
                "-c foo.c -Xpreprocessor -dD",
                Reason::PreprocessorPassthrough,
            ),
            ("-c foo.c -fplugin=x.so", Reason::ExternalInputs),
            ("-c foo.c -specs=my.specs", Reason::ExternalInputs),
            ("-c foo.c -B /opt/bin", Reason::ExternalInputs),
            ("-c foo.c -I", Reason::UnknownOption),
            ("-c foo.c -MG", Reason::UnknownOption),
            ("-c foo.c -Xassembler -aln=f.lst", Reason::ExtraOutput),
            ("-c foo.c -O3 -fopt-info-vec=opt.txt", Reason::ExtraOutput),
            (
                "-c foo.c -fproc-stat-report=s.csv",
                Reason::Nondeterministic,
            ),
            ("-c foo.c -fproc-stat-report", Reason::Nondeterministic),
        ];
        for (cmd, want) in uncacheable {
            assert_eq!(classify(words(cmd)), Err(want), "{cmd}");
        }
    }

    #[test]
    fn refusals_name_the_argument_and_the_source() {
        let table: &[(&str, Reason, Option<&str>, Option<&str>)] = &[
            // (command, reason, argument named, source named)
            ("--version", Reason::NotACompile, Some("--version"), None),
            (
                "-c foo.c --frobnicate",
                Reason::UnknownOption,
                Some("--frobnicate"),
                Some("foo.c"),
            ),
            (
                "-c -o - src/a.cc",
                Reason::ExtraOutput,
                Some("-o -"),
                Some("src/a.cc"),
            ),
            (
                "-c -I inc -fplugin=x.so b.c",
                Reason::ExternalInputs,
                Some("-fplugin=x.so"),
                Some("b.c"),
            ),
            ("foo.c -o app", Reason::Link, None, Some("foo.c")),
            ("-c -x c -", Reason::StdinSource, Some("-"), None),
        ];
        for (cmd, reason, arg, source) in table {
            let r = classify_explained(words(cmd)).unwrap_err();
            assert_eq!((r.reason, r.arg.as_deref()), (*reason, *arg), "{cmd}");
            assert_eq!(source_in(&words(cmd)), *source, "{cmd}");
        }
    }

    #[test]
    fn outputs_and_dependency_files() {
        let c = classify(words("-c src/foo.c")).unwrap();
        assert_eq!(c.output, Path::new("foo.o"));
        let c = classify(words("-S src/foo.c")).unwrap();
        assert_eq!(c.output, Path::new("foo.s"));
        let c = classify(words("-c foo.c -o obj/foo.o -MD")).unwrap();
        assert_eq!(
            c.dep_file,
            Some(DepFile {
                path: "obj/foo.d".into(),
                user_headers_only: false,
                add_mf: true
            })
        );
        let c = classify(words("-c foo.c -MMD -MF x.d")).unwrap();
        assert_eq!(
            c.dep_file,
            Some(DepFile {
                path: "x.d".into(),
                user_headers_only: true,
                add_mf: false
            })
        );
        let c = classify(words("-c foo.c -MD")).unwrap();
        assert_eq!(c.dep_file.unwrap().path, Path::new("foo.d"));
        assert_eq!(dwo_path(Path::new("out/noext")), Path::new("out/noext.dwo"));
        let c = classify(words("-c foo.c -g -O2")).unwrap();
        assert!(c.debug);
        assert!(!c.records_cwd);
        assert!(
            classify(words("-c foo.c -g -gsplit-dwarf=split"))
                .unwrap()
                .split_dwarf
        );
        assert!(
            !classify(words("-c foo.c -g -gsplit-dwarf=single"))
                .unwrap()
                .split_dwarf
        );
        for cmd in [
            "-c f.c -fprofile-instr-generate -fcoverage-mapping",
            "-c s.S -Wa,-g",
            "-c s.S -Xassembler --gdwarf-5",
            "-c f.c -fprofile-use=prof",
            "-c f.c -fprofile-dir=p",
        ] {
            assert!(classify(words(cmd)).unwrap().records_cwd, "{cmd}");
        }
        let c = classify(words("-c foo.c -g -g0")).unwrap();
        assert!(!c.debug);
        let c = classify(words("-c foo.c -Iinc -I inc2 -isystem sys -iquote q")).unwrap();
        assert_eq!(c.include_dirs.angle, ["inc", "inc2"]);
        assert_eq!(c.include_dirs.system, ["sys"]);
        assert_eq!(c.include_dirs.quote, ["q"]);
    }

    #[test]
    fn output_name_is_not_hashed_unless_it_shows() {
        let a = classify(words("-c foo.c -o a.o -O2")).unwrap();
        let b = classify(words("-c foo.c -o b.o -O2")).unwrap();
        assert_eq!(a.hashed_args, b.hashed_args);
        let a = classify(words("-c foo.c -o a.o -O2 -DX")).unwrap();
        assert_ne!(a.hashed_args, b.hashed_args);
    }

    #[test]
    fn response_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r1"), "-c 'a b.c' \"-DX=1 2\" @r2\n").unwrap();
        std::fs::write(dir.path().join("r2"), "-o out\\ file.o").unwrap();
        let got = expand_response_files(&words("-O2 @r1"), dir.path()).unwrap();
        assert_eq!(got, ["-O2", "-c", "a b.c", "-DX=1 2", "-o", "out file.o"]);
        assert_eq!(
            expand_response_files(&words("@missing"), dir.path()),
            Err(Reason::ResponseFile)
        );
        std::fs::write(dir.path().join("loop"), "@loop").unwrap();
        assert_eq!(
            expand_response_files(&words("@loop"), dir.path()),
            Err(Reason::ResponseFile)
        );
        std::fs::write(dir.path().join("open"), "'unterminated").unwrap();
        assert_eq!(
            expand_response_files(&words("@open"), dir.path()),
            Err(Reason::ResponseFile)
        );
    }
}
