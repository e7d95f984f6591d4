"""Every ``facetier train`` stage, its data loading and face labels. Production jobs never import this."""
