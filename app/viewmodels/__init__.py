"""View models: QObjects without widgets that hold what the windows show, built by pure reducer functions."""
