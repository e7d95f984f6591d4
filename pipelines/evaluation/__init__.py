"""eval-lfw, eval-semantic, eval-prior, measure and bench, sharing ``protocol`` (verification, face
sampling, galleries). Production jobs never import this."""
