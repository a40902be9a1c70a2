//! Legacy platform devices: 16550 serial glue, ACPI power/reset register, i8042 reset.
