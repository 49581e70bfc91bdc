"""One thin module per `video-ktr` command: parse the options, call the layers below, print the result."""
