"""How good a trained run is: model metrics on held-out windows, generation quality
against real text, text statistics, and the plots of them."""
