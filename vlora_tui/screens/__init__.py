"""One screen per app mode (browser, adapter, collection, subspace, jobs) plus help."""
