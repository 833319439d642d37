//! The EC2 side of a recovery: RegisterImage from the point's snapshots, RunInstances, the
//! wait until running; and the drill listing and clean-up.

use crate::catalog::PointRecord;
use crate::snapshots::ebs::client::{Aws, EbsError};
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, InstanceType,
    LaunchTemplateSpecification, ResourceType, Tag, TagSpecification, VolumeType,
};
use lifeboat_common::config::LaunchConfig;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One disk of the image: its snapshot and where it attaches.
#[derive(Clone, Debug, Serialize)]
pub struct Mapping {
    pub disk: String,
    pub device: String,
    pub snapshot_id: String,
}

/// The device names of a point's disks: the boot disk first as `/dev/xvda`, the others in
/// the point's order from `/dev/xvdb`.
pub fn devices(rec: &PointRecord, boot: &str) -> Result<Vec<(String, String)>, String> {
    if !rec.disks.iter().any(|d| d.id == boot) {
        return Err(format!(
            "the boot disk {boot:?} is not a disk of point {} (it has: {}); set boot_disk in \
             [recovery.{}]",
            rec.point,
            rec.disks
                .iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            rec.server
        ));
    }
    let mut out = vec![(boot.to_string(), "/dev/xvda".to_string())];
    for (n, d) in rec.disks.iter().filter(|d| d.id != boot).enumerate() {
        let letter = b'b' + n as u8;
        if letter > b'z' {
            return Err(format!(
                "point {} has more disks than device names",
                rec.point
            ));
        }
        out.push((d.id.clone(), format!("/dev/xvd{}", letter as char)));
    }
    Ok(out)
}

/// The boot disk: the configured one, else "root" if the point has it, else its first.
pub fn boot_disk(rec: &PointRecord, launch: &LaunchConfig) -> String {
    launch.boot_disk.clone().unwrap_or_else(|| {
        if rec.disks.iter().any(|d| d.id == "root") {
            "root".into()
        } else {
            rec.disks.first().map(|d| d.id.clone()).unwrap_or_default()
        }
    })
}

fn tags(rec: &PointRecord, drill: bool, kind: ResourceType) -> TagSpecification {
    let tag = |k: &str, v: String| Tag::builder().key(k).value(v).build();
    TagSpecification::builder()
        .resource_type(kind)
        .tags(tag("lifeboat:server", rec.server.clone()))
        .tags(tag("lifeboat:point", rec.point.to_string()))
        .tags(tag("lifeboat:drill", drill.to_string()))
        .tags(tag(
            "Name",
            format!(
                "lifeboat {} {} point {}",
                if drill { "drill" } else { "recovery" },
                rec.server,
                rec.point
            ),
        ))
        .build()
}

/// Whether a DryRun call would have succeeded (EC2 answers DryRunOperation), with AWS's
/// words when not.
fn dry_run_verdict<T>(r: Result<T, EbsError>) -> Result<(), EbsError> {
    match r {
        Err(EbsError::Permanent { message, .. }) if message.starts_with("DryRunOperation") => {
            Ok(())
        }
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}

/// Registers the image (or, with `dry_run`, asks EC2 whether it would); returns its id.
pub async fn register_image(
    aws: &Aws,
    rec: &PointRecord,
    launch: &LaunchConfig,
    mappings: &[Mapping],
    drill: bool,
    dry_run: bool,
) -> Result<Option<String>, EbsError> {
    let what = format!("server {} point {}", rec.server, rec.point);
    let name = format!(
        "lifeboat-{}-p{}-{}",
        rec.server,
        rec.point,
        crate::status::now_ms() / 1000
    );
    let volume = VolumeType::from(launch.volume_type.as_deref().unwrap_or("gp3"));
    let r = aws
        .retry("RegisterImage", &what, None, || {
            let mut req = aws
                .ec2
                .register_image()
                .name(&name)
                .description(format!(
                    "Lifeboat {} of {} at point {}",
                    if drill { "drill" } else { "recovery" },
                    rec.server,
                    rec.point
                ))
                .architecture(ArchitectureValues::from(
                    launch.architecture.as_deref().unwrap_or("x86_64"),
                ))
                .boot_mode(BootModeValues::from(
                    launch.boot_mode.as_deref().unwrap_or("uefi-preferred"),
                ))
                .virtualization_type("hvm")
                .ena_support(true)
                .root_device_name("/dev/xvda")
                .tag_specifications(tags(rec, drill, ResourceType::Image))
                .dry_run(dry_run);
            for m in mappings {
                req = req.block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name(&m.device)
                        .ebs(
                            EbsBlockDevice::builder()
                                .snapshot_id(&m.snapshot_id)
                                .volume_type(volume.clone())
                                .delete_on_termination(true)
                                .build(),
                        )
                        .build(),
                );
            }
            req.send()
        })
        .await;
    if dry_run {
        return dry_run_verdict(r).map(|()| None);
    }
    let id = r?
        .image_id()
        .ok_or_else(|| EbsError::Local(format!("{what}: RegisterImage answered no image id")))?
        .to_string();
    // The tags again, on their own: an EC2 (or a test double) that ignores RegisterImage's
    // TagSpecifications must still let `drills` find the image.
    let spec = tags(rec, drill, ResourceType::Image);
    aws.retry(
        "CreateTags",
        &id,
        Some(Instant::now() + Duration::from_secs(60)),
        || {
            aws.ec2
                .create_tags()
                .resources(&id)
                .set_tags(Some(spec.tags().to_vec()))
                .send()
        },
    )
    .await?;
    Ok(Some(id))
}

/// What a launch gave.
#[derive(Clone, Debug, Serialize)]
pub struct Instance {
    pub instance_id: String,
    pub private_ip: Option<String>,
    pub state: String,
}

/// Launches one instance from `image` (or, with `dry_run`, asks EC2 whether it would).
pub async fn run_instance(
    aws: &Aws,
    rec: &PointRecord,
    launch: &LaunchConfig,
    image: &str,
    drill: bool,
    dry_run: bool,
    token: &str,
) -> Result<Option<String>, EbsError> {
    let what = format!("server {} point {}", rec.server, rec.point);
    let r = aws
        .retry("RunInstances", &what, None, || {
            let mut req = aws
                .ec2
                .run_instances()
                .image_id(image)
                .min_count(1)
                .max_count(1)
                .client_token(token)
                .tag_specifications(tags(rec, drill, ResourceType::Instance))
                .tag_specifications(tags(rec, drill, ResourceType::Volume))
                .dry_run(dry_run);
            if let Some(t) = &launch.launch_template_id {
                req = req.launch_template(
                    LaunchTemplateSpecification::builder()
                        .launch_template_id(t)
                        .build(),
                );
            }
            if launch.launch_template_id.is_none() || launch.instance_type.is_some() {
                req = req.instance_type(InstanceType::from(
                    launch.instance_type.as_deref().unwrap_or("t3.medium"),
                ));
            }
            if let Some(s) = &launch.subnet_id {
                req = req.subnet_id(s);
            }
            for g in launch.security_group_ids.iter().flatten() {
                req = req.security_group_ids(g);
            }
            if let Some(k) = &launch.key_name {
                req = req.key_name(k);
            }
            req.send()
        })
        .await;
    if dry_run {
        return dry_run_verdict(r).map(|()| None);
    }
    let out = r?;
    let id = out
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .ok_or_else(|| EbsError::Local(format!("{what}: RunInstances answered no instance")))?
        .to_string();
    Ok(Some(id))
}

/// Waits until the instance runs (at most `limit`); returns it as last seen.
pub async fn wait_running(aws: &Aws, id: &str, limit: Duration) -> Result<Instance, EbsError> {
    let deadline = Instant::now() + limit;
    let fresh = Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(500);
    loop {
        let out = aws
            .retry("DescribeInstances", id, Some(fresh), || {
                aws.ec2.describe_instances().instance_ids(id).send()
            })
            .await?;
        let inst = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id));
        let state = inst
            .and_then(|i| i.state())
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        let seen = Instance {
            instance_id: id.to_string(),
            private_ip: inst
                .and_then(|i| i.private_ip_address())
                .map(str::to_string),
            state: state.clone(),
        };
        match state.as_str() {
            "running" => return Ok(seen),
            "terminated" | "shutting-down" | "stopped" | "stopping" => {
                let why = inst
                    .and_then(|i| i.state_reason())
                    .and_then(|r| r.message())
                    .unwrap_or("no reason given");
                return Err(EbsError::Permanent {
                    op: "DescribeInstances",
                    what: id.to_string(),
                    message: format!("instance {id} went {state}: {why}"),
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(EbsError::Local(format!(
                "instance {id} is still {state:?} after {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// A drill instance or image, as `drills` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Drill {
    pub kind: &'static str,
    pub id: String,
    pub server: String,
    pub point: String,
    pub state: String,
}

fn tag_of<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> &'a str {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
        .unwrap_or("")
}

/// Every instance and image tagged as a Lifeboat drill (terminated instances left out).
pub async fn list_drills(aws: &Aws) -> Result<Vec<Drill>, EbsError> {
    let filter = || {
        Filter::builder()
            .name("tag:lifeboat:drill")
            .values("true")
            .build()
    };
    let mut out = Vec::new();
    let instances = aws
        .retry("DescribeInstances", "drills", None, || {
            aws.ec2.describe_instances().filters(filter()).send()
        })
        .await?;
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        if state == "terminated" {
            continue;
        }
        out.push(Drill {
            kind: "instance",
            id: i.instance_id().unwrap_or_default().to_string(),
            server: tag_of(i.tags(), "lifeboat:server").to_string(),
            point: tag_of(i.tags(), "lifeboat:point").to_string(),
            state,
        });
    }
    let images = aws
        .retry("DescribeImages", "drills", None, || {
            aws.ec2
                .describe_images()
                .owners("self")
                .filters(filter())
                .send()
        })
        .await?;
    for im in images.images() {
        out.push(Drill {
            kind: "image",
            id: im.image_id().unwrap_or_default().to_string(),
            server: tag_of(im.tags(), "lifeboat:server").to_string(),
            point: tag_of(im.tags(), "lifeboat:point").to_string(),
            state: im
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Terminates drill instances and deregisters drill images (the point snapshots stay: they
/// are the points', kept by retention).
pub async fn terminate(aws: &Aws, drills: &[Drill]) -> Result<(), EbsError> {
    let instances: Vec<String> = drills
        .iter()
        .filter(|d| d.kind == "instance")
        .map(|d| d.id.clone())
        .collect();
    if !instances.is_empty() {
        aws.retry("TerminateInstances", "drills", None, || {
            aws.ec2
                .terminate_instances()
                .set_instance_ids(Some(instances.clone()))
                .send()
        })
        .await?;
    }
    for d in drills.iter().filter(|d| d.kind == "image") {
        aws.retry("DeregisterImage", &d.id, None, || {
            aws.ec2.deregister_image().image_id(&d.id).send()
        })
        .await?;
    }
    Ok(())
}
