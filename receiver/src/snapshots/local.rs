//! The local target: a point is its manifests plus `point.json` under the catalog, its blocks
//! the staging store's. Manifests are written and fsync'd first, `point.json` last, so the
//! point is listed only once all of it is durable.

use super::SnapshotTarget;
use crate::catalog::{Catalog, CatalogError, PointRecord};
use lifeboat_common::durable;
use lifeboat_common::manifest::Manifest;

pub struct LocalTarget {
    catalog: Catalog,
}

impl LocalTarget {
    pub fn new(catalog: Catalog) -> LocalTarget {
        LocalTarget { catalog }
    }
}

impl SnapshotTarget for LocalTarget {
    fn name(&self) -> &'static str {
        "local"
    }

    fn write_point(
        &self,
        rec: &PointRecord,
        manifests: &[(String, Manifest)],
    ) -> Result<(), CatalogError> {
        let dir = self.catalog.point_dir(&rec.server, rec.point);
        let ioe = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| CatalogError::Io { path, source }
        };
        durable::create_dir_all_durable(&dir).map_err(ioe(&dir))?;
        for (disk, m) in manifests {
            let p = dir.join(format!("{disk}.manifest"));
            durable::write_atomic(&p, &m.encode()).map_err(ioe(&p))?;
        }
        let p = dir.join("point.json");
        let json = serde_json::to_vec_pretty(rec).map_err(|e| CatalogError::BadRecord {
            path: p.clone(),
            why: e.to_string(),
        })?;
        durable::write_atomic(&p, &json).map_err(ioe(&p))
    }
}
