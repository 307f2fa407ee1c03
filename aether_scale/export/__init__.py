"""Taking results out of the workspace: Cloud Optimized GeoTIFFs and portable models."""
