//! Images (AMIs) and instances, the EC2 model built out of snapshot
//! operations: [`rules`] (what an image must be: names, architectures,
//! volume sizes, mappings, one name per owner), [`ops`] (register,
//! permissions, deprecation, deregister), [`create`] (snapshot volumes or
//! an instance and register the result), [`instance`] (launch: restore an
//! image's volumes; terminate), [`copy`] (to another region).
//!
//! The image files themselves are read and written by `region::images`;
//! their layout is `format::image`.

pub mod copy;
pub mod create;
pub mod instance;
pub mod ops;
pub mod rules;
