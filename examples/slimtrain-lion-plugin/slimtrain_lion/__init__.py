"""An example slimtrain optimizer method (a Lion update rule) in its own distribution."""
