//! placeholder
pub struct Cluster;
pub struct ClusterCount;
pub struct ClusterStats;
pub fn cluster_intervals() {}
