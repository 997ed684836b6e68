"""The application around the library: the `scm` command (cli), the demo and the report writer. Nothing in the
library (everything else under `scm`) imports this package."""
