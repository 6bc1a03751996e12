"""Hello, Blue World! / Hello, Green World!: a canary release of a Django view with canarymw."""
