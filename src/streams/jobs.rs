//! The channels' job: the `input-boot-sweep`, which boots a run for `.in`
//! records no run is known to read (an append whose follow-up never ran: a
//! crash between storing the record and the boot).

use super::effects::Appender;
use crate::jobs::runtime::Outcome;

pub async fn input_boot_sweep(appender: &Appender) -> Outcome {
    let (booted, checked) = appender.boot_unread_input().await?;
    Ok(format!("{booted} runs booted for unread input ({checked} sessions checked)"))
}
