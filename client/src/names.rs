//! Enums whose variants have stable names (the counters of `kiln stats`).
//!
//! [`named_enum!`] declares the enum and its names in one table, so a new variant cannot be
//! left out of the list the statistics walk, as a list kept beside the enum by hand could.

/// Declares an enum whose variants each carry a stable name, and derives from the one table:
/// `name()`, the variant's name, and `NAMES`, every name in declaration order. Variants may
/// hold fields (`Unreachable(String) = "unreachable"`).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident $( ( $($field:ty),* $(,)? ) )? = $name:literal
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $ty {
            $(
                $(#[$vmeta])*
                $variant $( ( $($field),* ) )?
            ),*
        }

        impl $ty {
            /// Every variant's stable name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The stable name, as counted in the statistics.
            pub fn name(&self) -> &'static str {
                match self {
                    $( $ty::$variant { .. } => $name, )*
                }
            }
        }
    };
}

pub(crate) use named_enum;
